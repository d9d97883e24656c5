"""Tables, plots, targets and the generated block of docs/benchmarks.md, from scripts/benchmark.py's rows."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from pathlib import Path
from typing import Any

import bench_decode
from bench_choices import choice_markdown, choice_rows
from bench_plots import _mode_words

MIB = 1024 * 1024
PER_TENSOR = ("tensor", "static")


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or d.get(p) is None:
            return None
        d = d[p]
    return d


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def speed_summary(per: dict[str, list[float]]) -> dict[str, float]:
    """Medians of tokens/s, and ratios as medians of per-window ratios (each pair measured back to back)."""
    def paired(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(per[a], per[b], strict=True))

    return {"row_tokens_per_s": statistics.median(per["row_eval"]),
            "fp32_tokens_per_s": statistics.median(per["fp_eval"]),
            "bare_tokens_per_s": statistics.median(per["row_bare"]),
            "ratio_to_fp32": paired("row_eval", "fp_eval"), "evaluator_over_bare": paired("row_eval", "row_bare"),
            "evaluator_wall_over_bare": paired("row_eval_wall", "row_bare")}


def describe(r: dict[str, Any]) -> str:
    if r["kind"] == "fp":
        return f"{r['dtype']} (no quantization)"
    if r["kind"] == "peer":
        return f"stock transformers `BitsAndBytesConfig(load_in_8bit=True)` (threshold {r['quantize']['threshold']:g})"
    q, rec = r["quantize"], r["recipe"]
    qz = rec["quantization"]
    method = qz["method"]
    skip = [s for s in qz.get("skip", []) if s != "lm_head"]
    # what the run did (rows measured before it was recorded: the recipe, where `rotate: auto` says nothing)
    rotated = bool(q["rotation"]) if "rotation" in q else qz.get("rotate") is True
    unknown = "rotation" not in q and qz.get("rotate") == "auto"
    extra = "".join([", residual stream rotated" if rotated else ", rotate auto" if unknown else "",
                     f", {', '.join(skip)} kept in 16-bit" if skip else "",
                     ", round-to-nearest weights" if qz.get("gptq") is False else ""])
    if method == "weight-only":  # the report has no alpha when nothing was rescaled
        extra += f", activation-aware scaling alpha {q['alpha']}" if q.get("alpha") not in (None, 0) else ", no scaling"
    if method != "smoothquant":
        return f"llmq `{method}` (threshold {q['threshold']:g}){extra}, {r['recipe_file']}"
    alpha = "auto" if q["alpha"] == "auto" else f"{q['alpha']:g}"
    mean = f", mean alpha {q['mean_alpha']:.2f}" if q["alpha"] == "auto" and q["mean_alpha"] is not None else ""
    return (f"llmq `smoothquant` W8A8, alpha {alpha}{mean}, groups {', '.join(rec['smoothing']['groups'])}"
            f"{extra}, {r['recipe_file']}")


def main_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    fp = results.get("fp32")
    fp_ppl = _get(fp, "eval", "perplexity")
    out = []
    for name, r in results.items():
        if r["kind"] in ("sim", "decode"):
            continue
        if r.get("skipped"):
            out.append({"row": name, "skipped": r["skipped"]})
            continue
        ev, q = r["eval"], r.get("quantize") or {}
        sp = speed_summary(r["speed"]["per_window"])  # rows measured before the paired ratios get them too
        fwd = _get(r, "fp_calibration_forward", "seconds")
        out.append({
            "row": name, "what": describe(r), "perplexity": ev["perplexity"],
            "perplexity_ratio": _ratio(ev["perplexity"], fp_ppl), "kl": ev["kl_divergence"],
            "top1": ev["top1_agreement"], "checkpoint_bytes": r["checkpoint_bytes"],
            "checkpoint_ratio_fp16": _ratio(r["checkpoint_bytes"], r["fp16_bytes"]),
            "bytes_per_int8_weight": r["bytes_per_int8_weight"], "weight_memory_bytes": ev["weight_memory_bytes"],
            "quantize_seconds": q.get("seconds"), "quantize_over_fp_forward": _ratio(q.get("seconds"), fwd),
            "fp_forward_seconds": fwd, "quantize_peak_above_bytes": q.get("peak_above_baseline_bytes"),
            "quantize_includes_loading": bool(q.get("includes_loading")),
            "eval_tokens_per_s": ev["tokens_per_second"], "ratio_to_fp32": sp["ratio_to_fp32"],
            "evaluator_over_bare": sp["evaluator_over_bare"],
            "evaluator_wall_over_bare": sp["evaluator_wall_over_bare"],
            "speed_row_tokens_per_s": sp["row_tokens_per_s"], "speed_fp32_tokens_per_s": sp["fp32_tokens_per_s"],
            "load": r.get("loadavg_1min", [0.0, 0.0]),
        })
    return out


def fidelity_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row and evaluation text: KL, top-1 and perplexity / FP32 over the calibration seeds measured."""
    def entries(r: dict[str, Any]) -> list[dict[str, Any]]:
        return r.get("quality") or ([r["eval"]] if r.get("eval") else [])

    fp_ppl = {e.get("data"): e["perplexity"] for e in entries(results.get("fp32", {}))}
    out = []
    for name, r in results.items():
        if r["kind"] in ("sim", "decode") or r.get("skipped"):
            continue
        by: dict[str, list[dict[str, Any]]] = {}
        for e in entries(r):
            by.setdefault(e.get("data"), []).append(e)
        for data, es in by.items():
            out.append({"row": name, "data": data, "seeds": [e.get("seed") for e in es],
                        "kl": [e["kl_divergence"] for e in es if e.get("kl_divergence") is not None],
                        "top1": [e["top1_agreement"] for e in es if e.get("top1_agreement") is not None],
                        "ppl_ratio": [x for x in (_ratio(e["perplexity"], fp_ppl.get(data)) for e in es)
                                      if x is not None], "tokens": es[0]["tokens"]})
    return out


def _spread(v: list[float], spec: str) -> str:
    if not v:
        return "ref"
    if len(v) == 1:
        return format(v[0], spec)
    return f"{format(statistics.mean(v), spec)} ({format(min(v), spec)} to {format(max(v), spec)})"


def fidelity_markdown(fid: list[dict[str, Any]]) -> list[str]:
    """Shown when there is more than one text or seed: mean (min to max) over calibration seeds."""
    if len({f["data"] for f in fid}) < 2 and all(len(f["seeds"]) < 2 for f in fid):
        return []
    lines = ["#### Fidelity by evaluation text and calibration seed", "",
             "Mean (min to max) over the calibration seeds each row was quantized with (rows that do not "
             "calibrate have one); every text scored with the protocol above, against FP32 on the same windows.",
             "", "| row | text | scored tokens | seeds | KL vs FP32 | top-1 vs FP32 | perplexity / FP32 |",
             "|---|---|---|---|---|---|---|"]
    for f in fid:
        lines.append(f"| {f['row']} | {f['data']} | {f['tokens']} | {', '.join(map(str, f['seeds']))} | "
                     f"{_spread(f['kl'], '.2e')} | {_spread(f['top1'], '.2%')} | {_spread(f['ppl_ratio'], '.4f')} |")
    return lines + [""]


def sim_table(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    modes = {}
    for r in results.values():
        if r["kind"] != "sim":
            continue
        pts = {("auto" if p["alpha"] == "auto" else f"{p['alpha']:.1f}"): p for p in r["points"]}
        modes[r["mode"]] = {"act": r["act"], "weight": r["weight"], "fp_perplexity": r["fp_perplexity"],
                            "tokens": r["tokens"], "protocol": r["protocol"], "points": pts,
                            "calibration_tokens": r["calibration_tokens"]}
    return modes


def _fmt(v: Any, spec: str, dash: str = "-") -> str:
    return dash if v is None else format(v, spec)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def targets(rows: list[dict[str, Any]], sim: dict[str, Any]) -> list[dict[str, Any]]:
    by = {r["row"]: r for r in rows if not r.get("skipped")}
    sq, naive = by.get("smoothquant-auto", {}), by.get("naive-w8a8", {})
    out = []
    ratio = sq.get("perplexity_ratio")
    ok = None if ratio is None else (ratio <= 1.003 and sq["perplexity"] <= naive.get("perplexity", float("inf")))
    out.append({"measure": "SmoothQuant auto W8A8 perplexity / FP32", "target": "<= 1.003, and <= naive W8A8",
                "value": f"{_fmt(ratio, '.4f')} (naive {_fmt(naive.get('perplexity_ratio'), '.4f')})", "met": ok,
                "by": None if ratio is None else f"{ratio - 1.003:+.4f} vs 1.003"})
    for m, d in sim.items():  # one line per per-tensor mode: the auto point decides, the best grid alpha beside it
        if d["act"] not in PER_TENSOR or "auto" not in d["points"]:
            continue
        auto = d["points"]["auto"]["perplexity"] / d["fp_perplexity"]
        k, best = min(((k, p["perplexity"]) for k, p in d["points"].items() if k not in ("auto", "0.0")),
                      key=lambda kv: kv[1])
        out.append({"measure": f"simulated per-tensor W8A8 ({m}: {_mode_words(d)}), smoothed, perplexity / FP32",
                    "target": "<= 1.10",
                    "value": f"auto {auto:.3f} (best fixed alpha {k}: {best / d['fp_perplexity']:.3f}; "
                             f"naive {d['points']['0.0']['perplexity'] / d['fp_perplexity']:.3f})",
                    "met": auto <= 1.10, "by": f"{auto - 1.10:+.3f} vs 1.10"})
    b = [r["bytes_per_int8_weight"] for r in by.values() if r.get("bytes_per_int8_weight")]
    out.append({"measure": "bytes per int8 linear weight (scales included)", "target": "<= 1.01",
                "value": f"{max(b):.4f} (every int8 row)" if b else "-", "met": max(b) <= 1.01 if b else None,
                "by": f"{max(b) - 1.01:+.4f} vs 1.01" if b else None})
    qr = sq.get("quantize_over_fp_forward")
    others = ", ".join(f"{r['row']} {r['quantize_over_fp_forward']:.2f}" for r in by.values()
                       if r.get("quantize_over_fp_forward") is not None and r["row"] != "smoothquant-auto")
    out.append({"measure": "quantize wall time / one FP forward over the calibration tokens (smoothquant-auto)",
                "target": "<= 2.0", "value": f"{_fmt(qr, '.2f')} (others: {others})", "met": None if qr is None
                else qr <= 2.0, "by": None if qr is None else f"{qr - 2.0:+.2f} vs 2.0"})
    ev = {r["row"]: r["evaluator_over_bare"] for r in by.values()}
    med = statistics.median(ev.values()) if ev else None
    noise = _get(by, "fp32", "ratio_to_fp32")
    out.append({"measure": "evaluator tokens/s / bare forward loop (median over rows; every row runs the same "
                "evaluator)", "target": ">= 0.95",
                "value": f"{_fmt(med, '.3f')} (worst row {_fmt(min(ev.values()) if ev else None, '.3f')}; "
                         f"noise: FP32 vs itself {_fmt(noise, '.3f')})",
                "met": None if med is None else med >= 0.95,
                "by": None if med is None else f"{med - 0.95:+.3f} vs 0.95"})
    sp = sq.get("ratio_to_fp32")
    more = ", ".join(f"{k} {by[k]['ratio_to_fp32']:.2f}" for k in ("naive-w8a8", "llm-int8", "weight-only",
                                                                   "transformers-bnb", "half") if k in by)
    out.append({"measure": "int8 (W8A8, smoothquant-auto) evaluation tokens/s / FP32, same process",
                "target": ">= 1.5", "value": f"{_fmt(sp, '.2f')} ({more})", "met": None if sp is None else sp >= 1.5,
                "by": None if sp is None else f"{sp - 1.5:+.2f} vs 1.5"})
    return out


def markdown(s: dict[str, Any]) -> str:
    m, rows, sim = s["machine"], s["rows"], s["simulated"]
    load = s["loadavg_1min"]
    lines = [f"### {s['model']}", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
             f"{m['memory_bytes'] / 2**30:.0f} GiB RAM, ISA {', '.join(m['isa']) or '-'}"
             + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU") + ". "
             f"torch {m['torch']}, transformers {m['transformers']}, bitsandbytes {m['bitsandbytes']}, "
             f"llmq {m['llmq']}, Python {m['python']}. 1-minute load average during the rows: "
             f"{load[0]:.1f} to {load[1]:.1f} (this machine has {m['cores']} cores; above that, absolute timings "
             "are inflated; ratios measured in one process, interleaved, much less).", "",
             f"Command: `{s['command']}` (report only: add `--report-only`).", "",
             f"Perplexity protocol: {s['protocol']}", "",
             f"Calibration (every calibrating row, recipes' own calibration replaced): {s['calibration']}.", "",
             "#### Fidelity and size", "",
             "KL(P_FP32 || P_row) and top-1 agreement with FP32 are the headline (they compare each token's whole "
             "distribution with the FP32 model's); perplexity beside them.", "",
             "| row | what | KL vs FP32 | top-1 vs FP32 | perplexity | / FP32 | checkpoint MiB | / fp16 | "
             "B per int8 weight | weights in RAM MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['row']} | skipped: {r['skipped']} |" + " - |" * 8)
            continue
        lines.append(
            f"| {r['row']} | {r['what']} | {_fmt(r['kl'], '.2e', 'ref')} | {_fmt(r['top1'], '.2%', 'ref')} | "
            f"{r['perplexity']:.4f} | {_fmt(r['perplexity_ratio'], '.4f')} | {r['checkpoint_bytes'] / MIB:.1f} | "
            f"{_fmt(r['checkpoint_ratio_fp16'], '.3f')} | {_fmt(r['bytes_per_int8_weight'], '.4f')} | "
            f"{r['weight_memory_bytes'] / MIB:.1f} |")
    lines += ["", *fidelity_markdown(s["fidelity"]), *choice_markdown(s.get("choices") or []),
              "#### Cost and speed", "",
              "| row | quantize s | / FP forward over calib tokens | quantize peak MiB above start | "
              "eval tok/s (full run) | tok/s / FP32 (same process) | evaluator / bare loop | load |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("skipped"):
            continue
        qs = _fmt(r["quantize_seconds"], ".1f") + (" (incl. loading)" if r["quantize_includes_loading"] else "")
        peak = r["quantize_peak_above_bytes"]
        lines.append(
            f"| {r['row']} | {qs} | {_fmt(r['quantize_over_fp_forward'], '.2f')} | "
            f"{_fmt(None if peak is None else peak / MIB, '.0f')} | "
            f"{r['eval_tokens_per_s']:.0f} | {r['ratio_to_fp32']:.2f} | {r['evaluator_over_bare']:.3f} | "
            f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")
    fwd = [r["fp_forward_seconds"] for r in rows if r.get("fp_forward_seconds")]
    full = s.get("fp32_all_windows") or {}
    if full:
        lines += ["", f"FP32 over all {full['windows']} evaluation windows, sequential (not interleaved): evaluator "
                  f"{full['evaluator_tokens_per_s']:.0f} tok/s, bare loop {full['tokens_per_s']:.0f} tok/s, "
                  f"ratio {full['evaluator_over_bare']:.3f}."]
    lines += ["", f"One FP32 forward over the calibration tokens: {min(fwd, default=0):.1f} to "
              f"{max(fwd, default=0):.1f} s (mean time of the timed windows x windows, measured in each row's "
              "process; each ratio uses its own row's measurement). The `load` column is the 1-minute load "
              "average at the row's start and end; compare absolute tokens/s across rows only at similar load. "
              "The fp32 row's ratio to FP32 is the model against itself: its distance from 1 shows the timing "
              f"noise of the run. Speed ratios: medians of per-window ratios over {s['speed_windows']} windows, "
              "the row's evaluator, the FP32 evaluator and a bare `model(ids)` loop interleaved in one process "
              "after a warm-up window. Evaluator tokens/s counts the model's forward time only "
              "(llmq/evaluate.py); with its log-softmax, NLL and bookkeeping included the evaluator reaches "
              f"{_fmt(_median_of(rows, 'evaluator_wall_over_bare'), '.3f')} of the bare loop (median over rows).",
              ""]
    lines += bench_decode.markdown(s["decode"], s["plots"].get("decode"))
    if sim:
        lines += _sim_markdown(sim)
    lines += ["#### Targets (issues 5 and 12)", "", "| measure | target | measured | verdict | margin |",
              "|---|---|---|---|---|"]
    for t in s["targets"]:
        lines.append(f"| {t['measure']} | {t['target']} | {t['value']} | {_verdict(t['met'])} | {t['by'] or '-'} |")
    for key, alt in (("alpha", "perplexity vs alpha"), ("memory", "memory vs perplexity")):
        if key in s["plots"]:
            lines += ["", f"![{alt}]({s['plots'][key]})"]
    return "\n".join([*lines, ""])


def _median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    v = [r[key] for r in rows if not r.get("skipped") and r.get(key) is not None]
    return statistics.median(v) if v else None


def _sim_markdown(sim: dict[str, Any]) -> list[str]:
    modes = list(sim)
    first = sim[modes[0]]
    keys = [k for k in first["points"] if k != "auto"]
    lines = ["#### Simulated W8A8 (fake quantization, float32)", "",
             f"Perplexity (and / FP32) on {first['tokens']} scored tokens: "
             f"{first['protocol']} FP32 perplexity {first['fp_perplexity']:.4f}. One alpha on every smoothing "
             "group (alpha 0 = naive, no smoothing); `auto` = per-group alpha searched with the simulated "
             "granularity on calibration rows (llmq/simulate.py), shown with its mean alpha. Static (O3) "
             f"activation scales from the calibration abs-max ({first['calibration_tokens']} tokens).", "",
             "| alpha | " + " | ".join(f"{m} ({_mode_words(sim[m])})" for m in modes) + " |",
             "|---|" + "---|" * len(modes)]
    for k in [*keys, "auto"]:
        cells = []
        for m in modes:
            p = sim[m]["points"].get(k)
            if p is None:
                cells.append("-")
                continue
            extra = f", mean alpha {p['mean_alpha']:.2f}" if k == "auto" else ""
            cells.append(f"{p['perplexity']:.3f} ({p['perplexity'] / sim[m]['fp_perplexity']:.3f}{extra})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def update_doc(doc: Path, slug: str, block: str) -> None:
    """Replace (or append) this model's generated block between its markers in docs/benchmarks.md."""
    begin, end = f"<!-- bench:{slug}:begin (generated by scripts/benchmark.py) -->", f"<!-- bench:{slug}:end -->"
    new = f"{begin}\n{block}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.is_file() else "# Benchmarks\n\n"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pat.sub(lambda _: new, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + new + "\n"
    doc.write_text(text, encoding="utf-8")


PEAK_NOTE = ("peak of the row's process while evaluating, with the FP32 model kept resident for the interleaved "
             "speed comparison: not one model's memory; `llmq eval INT8 --reference FP --json` measures each alone")


def _process_peaks(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The rows' raw results with each evaluation's peak renamed to what it is (PEAK_NOTE), so no JSON shows a
    per-model `peak_memory_bytes` that is really two models' peak."""
    def fix(ev: Any) -> Any:
        if not isinstance(ev, dict) or "peak_memory_bytes" not in ev:
            return ev
        ev = dict(ev)
        for k in ("peak_memory_bytes", "baseline_memory_bytes"):
            ev[f"process_{k}"] = ev.pop(k, None)
        return {**ev, "process_peak_note": PEAK_NOTE}

    out = {}
    for name, r in results.items():
        r = dict(r)
        if "eval" in r:
            r["eval"] = fix(r["eval"])
        if isinstance(r.get("quality"), list):
            r["quality"] = [fix(q) for q in r["quality"]]
        out[name] = r
    return out


def write(results: dict[str, dict[str, Any]], cfg: Any, model: str, slug: str, out_dir: Path,
          machine: dict[str, Any], command: str) -> list[Path]:
    from bench_config import half_dtype
    from bench_plots import plot_alpha, plot_decode, plot_memory

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "img").mkdir(exist_ok=True)
    rows, sim = main_rows(results), sim_table(results)
    decode = bench_decode.decode_rows(results, half_dtype(cfg))
    loads = [x for r in results.values() for x in r.get("loadavg_1min", [])]
    fp = results.get("fp32", {})
    cal = cfg.calibration
    plots = {k: f"img/bench-{slug}-{k}.png" for k, have in (("alpha", sim), ("memory", rows), ("decode", decode))
             if have}
    threads = sorted({r["torch_threads"] for r in results.values() if "torch_threads" in r})
    machine = {**machine, "torch_threads": "/".join(map(str, threads)) or machine["torch_threads"]}
    seeds = ", ".join(map(str, (cal.seed, *cal.spread_seeds)))
    s = {"model": model, "command": command, "machine": machine, "config": dataclasses.asdict(cfg), "plots": plots,
         "protocol": _get(fp, "eval", "protocol") or "-", "speed_windows": cfg.timing.speed_windows,
         "calibration": f"{cal.source}, {cal.samples} windows x {cal.seq_len} tokens, seed {seeds}",
         "loadavg_1min": [min(loads), max(loads)] if loads else [0.0, 0.0],
         "rows": rows, "simulated": sim, "fidelity": fidelity_rows(results), "decode": decode,
         "choices": choice_rows(results)}
    bare_all = _get(fp, "bare_all_windows")
    if bare_all:
        s["fp32_all_windows"] = {**bare_all, "windows": fp["eval"]["windows"],
                                 "evaluator_tokens_per_s": fp["eval"]["tokens_per_second"]}
    s["targets"] = targets(rows, sim) + [t for t in [bench_decode.target(decode)] if t]
    paths = [out_dir / f"bench-{slug}.json", out_dir / f"bench-{slug}.md"]
    paths[0].write_text(json.dumps({**s, "raw": _process_peaks(results)}, indent=1, default=str) + "\n",
                        encoding="utf-8")
    block = markdown(s)
    paths[1].write_text(block + "\n", encoding="utf-8")
    if sim:
        plot_alpha(sim, out_dir / plots["alpha"], f"{model}: simulated W8A8 perplexity vs smoothing alpha")
    if rows:
        plot_memory([r for r in rows if not r.get("skipped")], out_dir / plots["memory"],
                    f"{model}: memory vs perplexity per method")
    if decode:
        plot_decode(decode, out_dir / plots["decode"], f"{model}: generation speed at batch 1")
    paths += [out_dir / p for p in plots.values()]
    update_doc(out_dir / "benchmarks.md", slug, block)
    paths.append(out_dir / "benchmarks.md")
    return paths
