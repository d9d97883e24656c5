"""The decode part of scripts/benchmark.py's report: one line per model from the decode-<row> results
(llmq.speed.compare_decode, interleaved in one process per row), the plain "slower than 16-bit" sentences
with their measured ratios, and the CPU decode target."""

from __future__ import annotations

import statistics
from typing import Any

MIB = 1024 * 1024


def _span(res: dict[str, Any], prompt: bool) -> tuple[float, float]:
    """Slowest and fastest timed run, in tokens/s."""
    if prompt:
        v = [res["prompt_tokens"] / r["prefill_s"] for r in res["runs"]]
    else:
        v = [1 / r["decode_s_per_token"] for r in res["runs"]]
    return min(v), max(v)


def decode_rows(results: dict[str, dict[str, Any]], half: str) -> list[dict[str, Any]]:
    """The FP bases first (medians over the decode rows that timed them), then each int8 model and rest dtype."""
    from llmq.speed import matching_prefix

    groups = [r for r in results.values() if r["kind"] == "decode" and not r.get("skipped")]
    base: dict[str, list[dict[str, Any]]] = {}
    out = []
    for g in groups:
        res, bases = g["results"], g["bases"]
        fp32 = res.get("float32", {}).get("generated")
        for b in bases:
            base.setdefault(b, []).append({**res[b], "load": g["loadavg_1min"], "vs_fp32": None if fp32 is None
                                           else matching_prefix(res[b]["generated"], fp32),
                                           "ratios": {o: res[b]["ratios"][o] for o in bases if o != b}})
        for name, r in res.items():
            if name in bases:
                continue
            out.append(_line(r, name.split("+", 1)[0], name.split("+", 1)[1], False, half, g["loadavg_1min"],
                             {b: r["ratios"].get(b) for b in bases},
                             None if fp32 is None else matching_prefix(r["generated"], fp32)))
    fp_lines = []
    for b, rs in base.items():
        med = dict(rs[0])
        for k in ("decode_tokens_per_second", "prefill_tokens_per_second", "decode_seconds_per_token",
                  "peak_memory_bytes", "baseline_memory_bytes"):
            med[k] = statistics.median(x[k] for x in rs)
        med["runs"] = [run for x in rs for run in x["runs"]]
        ratios = {o: statistics.median(x["ratios"][o] for x in rs) for o in rs[0]["ratios"]}
        loads = [v for x in rs for v in x["load"]]
        fp_lines.append(_line(med, b, b, True, half, [min(loads), max(loads)], ratios, rs[0]["vs_fp32"],
                              groups=len(rs)))
    return fp_lines + out


def _line(r: dict[str, Any], model: str, rest: str, fp: bool, half: str, load: list[float],
          ratios: dict[str, float | None], greedy: int | None, groups: int = 1) -> dict[str, Any]:
    dmin, dmax = _span(r, False)
    pmin, pmax = _span(r, True)
    return {"model": model, "rest": rest, "fp": fp, "method": r.get("int8_method"), "device": r["device"],
            "decode_tokens_per_s": r["decode_tokens_per_second"], "decode_min": dmin, "decode_max": dmax,
            "ms_per_token": 1e3 * r["decode_seconds_per_token"],
            "prefill_tokens_per_s": r["prefill_tokens_per_second"], "prefill_min": pmin, "prefill_max": pmax,
            "ratios": ratios, "ratio_half": ratios.get(half), "half": half, "greedy_equal_fp32": greedy,
            "new_tokens": r["new_tokens"], "prompt_tokens": r["prompt_tokens"],
            "peak_above_bytes": r["peak_memory_bytes"] - r["baseline_memory_bytes"],
            "peak_bytes": r["peak_memory_bytes"], "memory_kind": r["peak_memory_kind"], "load": load, "groups": groups,
            "protocol": r.get("protocol", ""), "repeats": r["repeats"]}


def caveats(rows: list[dict[str, Any]]) -> list[str]:
    """One plain sentence per int8 model that decodes slower than the 16-bit base, with the measured ratio."""
    from llmq.speed import speed_caveat

    out = []
    for r in rows:
        if r["fp"] or r["ratio_half"] is None:
            continue
        s = speed_caveat(r["method"], r["device"].split(":")[0], r["ratio_half"], versus=f"{r['half']} ({r['device']})")
        if s:
            out.append(f"`{r['model']}` with {r['rest']} non-int8 parts: {s}")
    return out


def target(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Issue 12: on CPU, W8A8 decode at least bfloat16's (same-process ratio; the better rest dtype decides)."""
    w8a8 = [r for r in rows if r["method"] == "smoothquant" and r["ratio_half"] is not None]
    if not w8a8 or w8a8[0]["device"] != "cpu":
        return None
    prefer = [r for r in w8a8 if r["model"] == "smoothquant-auto"] or w8a8
    best = max(prefer, key=lambda r: r["ratio_half"])
    cells = ", ".join(f"{r['rest']} rest {r['ratio_half']:.2f}" for r in prefer)
    return {"measure": f"W8A8 ({best['model']}) decode tokens/s / {best['half']}, CPU, batch 1, same process",
            "target": ">= 1.0", "value": cells, "met": best["ratio_half"] >= 1.0,
            "by": f"{best['ratio_half'] - 1.0:+.2f} vs 1.0"}


def markdown(rows: list[dict[str, Any]], plot: str | None) -> list[str]:
    if not rows:
        return []
    bases = list(dict.fromkeys(b for r in rows for b in r["ratios"]))
    first = rows[0]
    lines = ["#### Decode (generation at batch 1, KV cache)", "",
             f"{first['protocol']} Each int8 model is its row's saved checkpoint loaded with `llmq.load(folder, "
             "dtype=...)` (the non-int8 parts: embeddings, norms, attention, lm_head, in that dtype), timed in one "
             "process interleaved with the FP models; the FP lines are medians over those processes "
             f"({first['groups']} of them). Ratios: medians of per-round ratios of back-to-back runs.", "",
             "| model | non-int8 parts | decode tok/s (min-max) | ms / token | prefill tok/s | "
             + " | ".join(f"decode / {b} (same process)" for b in bases)
             + f" | greedy tokens = float32 (of {first['new_tokens']}) | peak above start MiB | load |",
             "|---|---|---|---|---|" + "---|" * len(bases) + "---|---|---|"]
    for r in rows:
        ratios = " | ".join("-" if r["ratios"].get(b) is None else f"{r['ratios'][b]:.2f}" for b in bases)
        greedy = "-" if r["greedy_equal_fp32"] is None else str(r["greedy_equal_fp32"])
        name = f"**{r['model']}**" if r["fp"] else r["model"]
        lines.append(f"| {name} | {r['rest']} | {r['decode_tokens_per_s']:.1f} ({r['decode_min']:.1f}-"
                     f"{r['decode_max']:.1f}) | {r['ms_per_token']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{ratios} | {greedy} | {r['peak_above_bytes'] / MIB:.0f} | "
                     f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    notes = caveats(rows)
    if notes:
        lines += ["", "Where int8 decodes slower than 16-bit (measured here):", ""] + [f"- {n}" for n in notes]
    if plot:
        lines += ["", f"![decode tokens/s]({plot})"]
    return lines + [""]
