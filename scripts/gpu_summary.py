#!/usr/bin/env python
"""The last step of scripts/gpu_check.sh: the gpu-marked tests' outcomes (pytest's JUnit XML) and the CUDA
benchmark's numbers (scripts/benchmark.py's bench-<model>.json) -> OUT/gpu_check.json and OUT/gpu_check.md.

    python scripts/gpu_summary.py OUT --tests-rc N --bench-rc N|skipped --fetch-rc N --seconds S
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

MIB = 2**20
CASES = {"overflow": "W8A8 output overflow past float16 (CUDA int8_mm_dequant)",
         "gemma": "float16 smoothing of a Gemma (1 + w) norm"}


def tests(xml: Path) -> list[dict[str, Any]]:
    if not xml.is_file():
        return []
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").splitlines()[0][:300] if node.get("message") else ""
                break
        name = case.get("name", "")
        out.append({"test": f"{case.get('classname', '')}::{name}", "outcome": outcome,
                    "seconds": float(case.get("time") or 0), "message": message,
                    "case": next((c for c in CASES if c in name.lower()), None)})
    return out


def bench(folder: Path) -> dict[str, Any] | None:
    files = sorted(folder.glob("bench-*.json"))
    if not files:
        return None
    s = json.loads(files[0].read_text())
    raw = s.get("raw", {})
    rows = []
    for r in s.get("rows", []):
        if r.get("skipped"):
            continue
        ev = raw.get(r["row"], {}).get("eval", {})
        rows.append({"row": r["row"], "what": r["what"], "perplexity": r["perplexity"],
                     "perplexity_ratio": r["perplexity_ratio"], "kl": r["kl"], "top1": r["top1"],
                     "weights_mib": r["weight_memory_bytes"] / MIB,
                     # scripts/bench_report.py names it process_*: the FP32 reference stays resident beside the row
                     "eval_peak_vram_mib": (ev.get("process_peak_memory_bytes") or 0) / MIB,
                     "eval_peak_reserved_mib": (ev.get("peak_reserved_bytes") or 0) / MIB,
                     "memory_kind": ev.get("peak_memory_kind"), "prefill_tokens_per_s": r["eval_tokens_per_s"],
                     "prefill_ratio_to_fp32": r["ratio_to_fp32"]})
    decode = [{k: d[k] for k in ("model", "rest", "decode_tokens_per_s", "ms_per_token", "prefill_tokens_per_s",
                                 "ratios", "greedy_equal_fp32", "peak_bytes", "peak_above_bytes", "memory_kind")}
              for d in s.get("decode", [])]
    return {"file": str(files[0]), "machine": s.get("machine"), "protocol": s.get("protocol"), "rows": rows,
            "decode": decode, "targets": s.get("targets", [])}


def markdown(d: dict[str, Any]) -> str:
    m = (d.get("bench") or {}).get("machine") or {}
    lines = ["# gpu_check", "", f"GPU: {m.get('gpu', '?')}; torch {m.get('torch', '?')}, bitsandbytes "
             f"{m.get('bitsandbytes', '?')}, transformers {m.get('transformers', '?')}. Wall time {d['seconds']} s "
             f"(budget 480). Exit codes: tests {d['tests_rc']}, benchmark {d['bench_rc']}, fetch {d['fetch_rc']}.",
             "", "## gpu-marked tests", "", "| test | outcome | s | message |", "|---|---|---|---|"]
    for t in d["tests"]:
        lines.append(f"| {t['test']} | **{t['outcome']}** | {t['seconds']:.1f} | {t['message'] or '-'} |")
    lines += ["", "Cases:"] + [f"- {w}: " + (", ".join(t["outcome"] for t in d["tests"] if t["case"] == c) or "not run")
                               for c, w in CASES.items()]
    b = d.get("bench")
    if not b:
        return "\n".join([*lines, "", "No benchmark results (see bench.log / fetch.log).", ""])
    lines += ["", "## CUDA benchmark (llmq:smollm2)", "", f"Perplexity protocol: {b['protocol']}", "",
              "| row | perplexity | / FP32 | KL vs FP32 | top-1 | weights MiB | "
              "eval process peak VRAM MiB, FP32 reference resident (reserved) | prefill tok/s | prefill / FP32 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in b["rows"]:
        kl = "ref" if r["kl"] is None else f"{r['kl']:.2e}"
        top1 = "ref" if r["top1"] is None else f"{r['top1']:.2%}"
        lines.append(f"| {r['row']} | {r['perplexity']:.4f} | {r['perplexity_ratio']:.4f} | {kl} | {top1} | "
                     f"{r['weights_mib']:.1f} | {r['eval_peak_vram_mib']:.0f} ({r['eval_peak_reserved_mib']:.0f}) | "
                     f"{r['prefill_tokens_per_s']:.0f} | {r['prefill_ratio_to_fp32']:.2f} |")
    if b["decode"]:
        bases = list(dict.fromkeys(k for x in b["decode"] for k in x["ratios"]))
        lines += ["", "Decode at batch 1 (KV cache, greedy, fixed token count):", "",
                  "| model | non-int8 parts | decode tok/s | ms / token | prefill tok/s | "
                  + " | ".join(f"/ {x}" for x in bases) + " | decode peak VRAM MiB (above start) |",
                  "|---|---|---|---|---|" + "---|" * len(bases) + "---|"]
        for x in b["decode"]:
            cells = " | ".join("-" if x["ratios"].get(k) is None else f"{x['ratios'][k]:.2f}" for k in bases)
            lines.append(f"| {x['model']} | {x['rest']} | {x['decode_tokens_per_s']:.1f} | {x['ms_per_token']:.1f} | "
                         f"{x['prefill_tokens_per_s']:.0f} | {cells} | {x['peak_bytes'] / MIB:.0f} "
                         f"({x['peak_above_bytes'] / MIB:.0f}) |")
    return "\n".join([*lines, "", f"Full tables: {Path(b['file']).with_suffix('.md')}", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--tests-rc", default="?")
    ap.add_argument("--bench-rc", default="?")
    ap.add_argument("--fetch-rc", default="?")
    ap.add_argument("--seconds", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    d = {"seconds": a.seconds, "tests_rc": a.tests_rc, "bench_rc": a.bench_rc, "fetch_rc": a.fetch_rc,
         "tests": tests(out / "gpu_tests.xml"), "bench": bench(out / "bench")}
    (out / "gpu_check.json").write_text(json.dumps(d, indent=1, default=str) + "\n", encoding="utf-8")
    (out / "gpu_check.md").write_text(markdown(d), encoding="utf-8")
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}: "
          f"{sum(t['outcome'] == 'passed' for t in d['tests'])}/{len(d['tests'])} gpu tests passed; "
          f"benchmark {'complete' if a.bench_rc == '0' else 'incomplete (' + str(a.bench_rc) + ')'}")
    return 0 if d["tests"] or a.tests_rc == "5" else 1  # pytest exit 5: no tests collected


if __name__ == "__main__":
    sys.exit(main())
