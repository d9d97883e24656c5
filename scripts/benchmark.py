#!/usr/bin/env python
"""Benchmark every llmq method beside FP32/half and stock transformers + bitsandbytes: fidelity (KL, top-1,
perplexity), size, quantization cost, prefill and decode speed; and simulate the SmoothQuant paper's O1-O3
W8A8 granularities. Writes what docs/benchmarks.md shows.

    python scripts/benchmark.py                                  # configs/bench.yaml, llmq:smollm2 -> docs/
    python scripts/benchmark.py --rows 'fp32,half,smoothquant-auto,decode-*' --max-tokens 8192   # a subset
    python scripts/benchmark.py --only decode                    # decode rows only (and what they need)

Each row runs in its own process (peak memory is per process): the script calls itself with
`--row NAME --json FILE`. A row whose JSON exists with the same settings is skipped (resumable; `--force`
reruns). Then `<out-dir>/bench-<model>.json` (every number), `<out-dir>/bench-<model>.md` (tables),
`<out-dir>/img/bench-<model>-*.png` and the generated block of `<out-dir>/benchmarks.md` are written.

The FP32 row stores its logits per evaluation window in the work folder; later rows replay them as the
FP32 reference for KL / top-1 (the same numbers as running the FP32 model again, at no cost), and fall
back to the live FP32 model when the store is missing. The int8 rows named in `decode.rows` keep their
checkpoint there; each `decode-<row>` loads it as a user would and times generation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def slug(model: str) -> str:
    import re

    name = model.split(":", 1)[1] if model.startswith("llmq:") else Path(model.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".gguf")).strip("-").lower() or "model"


def machine() -> dict[str, Any]:
    import torch
    from bench_api import versions

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), [])
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0) if Path("/proc/meminfo").is_file() else 0
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_bytes": mem,
           "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")
                   if f in flags],
           "python": sys.version.split()[0], **versions()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _fresh(work: Path, cfg, model_id: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """The row's stored result if it was measured with the current settings (and left what decode needs)."""
    from bench_config import settings_key

    path = work / f"{row['name']}.json"
    old = json.loads(path.read_text()) if path.is_file() else None
    if not old or old.get("settings_key") != settings_key(cfg, model_id, row):
        return None
    return old


def plan(cfg, args: argparse.Namespace, model_id: str, work: Path) -> list[tuple[dict[str, Any], bool]]:
    """Rows to visit in order, each with `run` (measure now) or not (keep its JSON): the selected rows, plus
    the source row of a selected decode row when that row's checkpoint is missing or stale."""
    from bench_config import row_list, select

    rows = row_list(cfg)
    chosen = {r["name"] for r in select(rows, args.rows, args.only)}
    run = {r["name"] for r in rows if r["name"] in chosen and (args.force or not _fresh(work, cfg, model_id, r))}
    for r in rows:
        if r["kind"] == "decode" and r["name"] in chosen:
            src = next(s for s in rows if s["name"] == r["source"])
            if not _fresh(work, cfg, model_id, src) or not (work / f"ckpt-{src['name']}" / "DONE").is_file():
                chosen.add(src["name"])
                run.update((src["name"], r["name"]))
    return [(r, r["name"] in run) for r in rows if r["name"] in chosen]


def drive(cfg, args: argparse.Namespace, model_id: str, command: str) -> dict[str, Any]:
    work = Path(args.work_dir) / slug(model_id)
    work.mkdir(parents=True, exist_ok=True)
    (work / "command.txt").write_text(command + "\n", encoding="utf-8")  # --report-only quotes it
    write_json(work / "machine.json", machine())  # and describes the machine the rows ran on, not its own
    todo = plan(cfg, args, model_id, work)
    for i, (row, run) in enumerate(todo, 1):
        path = work / f"{row['name']}.json"
        if not run:
            print(f"[{i}/{len(todo)}] {row['name']}: kept {path} (same settings; --force reruns)", flush=True)
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--model", model_id,
               "--row", row["name"], "--json", str(path), "--work-dir", args.work_dir, *_overrides(args)]
        print(f"[{i}/{len(todo)}] {row['name']}: running (load {os.getloadavg()[0]:.1f}) ...", flush=True)
        t0 = time.perf_counter()
        logf = work / f"{row['name']}.log"
        with open(logf, "w") as f:
            rc = subprocess.run(cmd, stdout=None if args.verbose else f, stderr=None if args.verbose else f,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, cwd=ROOT).returncode
        if rc != 0:
            tail = "" if args.verbose else "\n".join(logf.read_text().splitlines()[-15:])
            raise SystemExit(f"row {row['name']} failed (exit {rc}); log {logf}:\n{tail}")
        print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
    return collect(cfg, work, model_id)


def collect(cfg, work: Path, model_id: str) -> dict[str, Any]:
    """Every row in the work folder measured with the current settings, in config order; rows measured with
    other settings are left out of the report (and named), never mixed in."""
    from bench_config import row_list

    rows = [r for r in row_list(cfg) if (work / f"{r['name']}.json").is_file()]
    fresh = {r["name"]: _fresh(work, cfg, model_id, r) for r in rows}
    stale = [n for n, v in fresh.items() if v is None]
    if stale:
        print(f"left out of the report (measured with other settings; rerun them or give the same flags): "
              f"{', '.join(stale)}", flush=True)
    return {n: v for n, v in fresh.items() if v is not None}


def _overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for k in FLAGS:
        v = getattr(args, k)
        if v is not None:
            out += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out + (["--verbose"] if args.verbose else [])


def _csv(kind: type = str):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


FLAGS = {"max_tokens": (int, "evaluation tokens per text (config: 20480)"),
         "seq_len": (int, "evaluation window (config: 1024)"),
         "extra_data": (_csv(), "more evaluation texts, comma-separated (any llmq text source)"),
         "calib_samples": (int, "calibration windows (config: 64)"),
         "spread_seeds": (_csv(int), "more calibration seeds for the fidelity spread, e.g. 1,2"),
         "sim_max_tokens": (int, "simulation evaluation tokens (config: 2048)"),
         "decode_repeats": (int, "timed decode runs per model (config: 5)"),
         "decode_prompt_tokens": (int, "decode prompt length (config: 512)"),
         "decode_new_tokens": (int, "tokens generated per decode run (config: 128)"),
         "threads": (int, "torch threads per row (default: torch's, one per core)")}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/bench.yaml")
    p.add_argument("--model", action="append", help="model(s) to benchmark (default: the config's)")
    p.add_argument("--out-dir", default="docs", help="JSON, markdown and img/ go here")
    p.add_argument("--work-dir", default="out/bench", help="per-row JSON and logs, stored FP32 logits")
    p.add_argument("--rows", type=_csv(), help="comma-separated row names or patterns (e.g. 'fp32,decode-*')")
    p.add_argument("--only", type=_csv(), help="row groups: main, decode, sim (comma-separated)")
    p.add_argument("--force", action="store_true", help="rerun rows whose JSON exists with the same settings")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from existing rows")
    p.add_argument("--keep-logits", action="store_true", help="keep the stored FP32 logits after the run")
    for k, (kind, text) in FLAGS.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=kind, help=text)
    p.add_argument("--verbose", action="store_true", help="show each row's output instead of logging it")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]  # the bench_* modules; llmq uninstalled
    from bench_config import load_config, row_list

    from llmq.errors import LlmqError

    args = parse(argv)
    os.chdir(ROOT)
    try:
        cfg = load_config(args.config, {k: getattr(args, k) for k in FLAGS})
    except LlmqError as e:
        raise SystemExit(f"benchmark: {e}") from None
    models = args.model or [cfg.model]
    if args.row:
        import torch
        from bench_rows import run_row

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        row = next(r for r in row_list(cfg) if r["name"] == args.row)
        work = Path(args.work_dir) / slug(models[0])
        write_json(Path(args.json), run_row(cfg, models[0], row, work, args.verbose))
        return
    import bench_report

    command = shlex.join(["python", "scripts/benchmark.py", *(argv if argv is not None else sys.argv[1:])])
    for model_id in models:
        work = Path(args.work_dir) / slug(model_id)
        if args.report_only:
            results = collect(cfg, work, model_id)
            ran = (work / "command.txt").read_text().strip() if (work / "command.txt").is_file() else command
            where = work / "machine.json"
            host = json.loads(where.read_text(encoding="utf-8")) if where.is_file() else machine()
        else:
            results, ran, host = drive(cfg, args, model_id, command), command, machine()
        paths = bench_report.write(results, cfg, model_id, slug(model_id), Path(args.out_dir), host, ran)
        print("wrote " + ", ".join(str(p) for p in paths))
        everything = {r["name"] for r in row_list(cfg)} <= set(results)
        if everything and not args.keep_logits and not args.report_only:  # 4 GB per text; checkpoints stay
            for d in work.glob("ref-*"):
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
