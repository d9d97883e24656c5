#!/usr/bin/env python
"""Benchmark every llmq method beside FP32/half and stock transformers + bitsandbytes, and simulate the
SmoothQuant paper's O1-O3 W8A8 granularities. Writes what docs/benchmarks.md shows.

    python scripts/benchmark.py                                  # configs/bench.yaml, llmq:smollm2 -> docs/
    python scripts/benchmark.py --max-tokens 2048 --calib-samples 4 --sim-max-tokens 1024 \
        --out-dir /tmp/bench --work-dir /tmp/bench/work          # a few-minute smoke run

Each row runs in its own process (peak memory is per process): the script calls itself with
`--row NAME --json FILE`. A row whose JSON exists with the same settings is skipped (resumable; `--force`
reruns). Then `<out-dir>/bench-<model>.json` (every number), `<out-dir>/bench-<model>.md` (tables),
`<out-dir>/img/bench-<model>-*.png` and the generated block of `<out-dir>/benchmarks.md` are written.

The FP32 row stores its logits per evaluation window in the work folder; later rows replay them as the
FP32 reference for KL / top-1 (the same numbers as running the FP32 model again, at no cost), and fall
back to the live FP32 model when the store is missing. A row loads the FP32 model (for speed ratios) only
after its evaluation, so the peak memory it reports is its own model's (unless it had to fall back).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("benchmark")


# ----------------------------------------------------------------------------------------- config
def load_config(path: str, args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    for key, (section, name) in {"max_tokens": ("evaluation", "max_tokens"), "seq_len": ("evaluation", "seq_len"),
                                 "calib_samples": ("calibration", "samples"),
                                 "sim_max_tokens": ("simulate", "max_tokens")}.items():
        if getattr(args, key, None) is not None:
            cfg[section][name] = getattr(args, key)
    cfg["threads"] = getattr(args, "threads", None)  # None: torch's default (one per core)
    return cfg


def slug(model: str) -> str:
    name = model.split(":", 1)[1] if model.startswith("llmq:") else Path(model.rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".gguf")).strip("-").lower() or "model"


def row_list(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    from llmq.simulate import SimMode

    rows = [dict(r, kind=r.get("kind", "llmq")) for r in cfg["rows"]]
    for act, weight in cfg["simulate"]["modes"]:
        rows.append({"name": f"sim-{SimMode(act, weight).name}", "kind": "sim", "act": act, "weight": weight})
    return rows


def settings_key(cfg: dict[str, Any], model: str, row: dict[str, Any]) -> str:
    keep = {"model": model, "row": row, "device": cfg["device"], "evaluation": cfg["evaluation"],
            "calibration": cfg["calibration"], "timing": cfg["timing"], "half": cfg["half_dtype"],
            "threads": cfg.get("threads")}
    if row["kind"] == "sim":
        keep["simulate"] = {k: v for k, v in cfg["simulate"].items() if k != "modes"}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------- measuring
def machine() -> dict[str, Any]:
    from llmq.pipeline import versions

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_bytes": mem,
           "isa": [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
                   if f in flags],
           "python": sys.version.split()[0], **versions()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare(model, ids: torch.Tensor) -> tuple[float, Any]:
    """One bare `model(ids)` call on one window: (seconds, logits)."""
    from llmq.evaluate import input_device

    dev = input_device(model)
    x = ids[None].to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    logits = model(x, use_cache=False).logits
    _sync(dev)
    return time.perf_counter() - t0, logits


def full_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    return [w for w in torch.split(ids, seq_len) if w.numel() == seq_len] or [ids]


def speed(model, fp, ids: torch.Tensor, seq_len: int, n: int) -> dict[str, Any]:
    """Interleaved on the same windows, after one warm-up window each: the evaluator on the row model and on
    the FP32 model, and a bare model(ids) loop on the row model. Medians of per-window tokens/s."""
    from llmq.evaluate import evaluate_ids

    wins = full_windows(ids, seq_len)
    warm, wins = wins[0], (wins[1:n + 1] or wins[:1])
    bare(model, warm)
    if fp is not model:
        bare(fp, warm)
    per: dict[str, list[float]] = {"row_eval": [], "row_eval_wall": [], "fp_eval": [], "row_bare": []}
    for i, w in enumerate(wins):
        steps = ["row", "fp", "bare"] if i % 2 == 0 else ["bare", "fp", "row"]
        for s in steps:
            if s == "bare":
                per["row_bare"].append(w.numel() / bare(model, w)[0])
                continue
            t0 = time.perf_counter()
            r = evaluate_ids(model if s == "row" else fp, w, seq_len, progress=False)
            if s == "row":
                per["row_eval"].append(r.tokens_per_second)
                per["row_eval_wall"].append(w.numel() / (time.perf_counter() - t0))
            else:
                per["fp_eval"].append(r.tokens_per_second)
    from bench_report import speed_summary

    return {"windows": len(wins), "tokens_per_window": int(wins[0].numel()), "per_window": per,
            **speed_summary(per)}


def fp_calibration_forward(fp, windows: torch.Tensor, n: int) -> dict[str, Any]:
    """One FP forward over all calibration windows, estimated as mean(window time of the first n) x windows."""
    times = [bare(fp, w)[0] for w in windows[: max(1, n)]]
    return {"seconds": statistics.mean(times) * windows.shape[0], "timed_windows": len(times),
            "windows": int(windows.shape[0]), "tokens": int(windows.numel())}


def checkpoint_stats(model, tok) -> dict[str, Any]:
    """Save with llmq.save_checkpoint into a temp folder; safetensors bytes and the int8 layout's bytes."""
    from safetensors import safe_open

    from llmq.save import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="llmq-bench-") as d:
        save_checkpoint(model, tok, Path(d))
        files = sorted(Path(d).glob("*.safetensors"))
        total = sum(f.stat().st_size for f in files)
        i8 = scb = 0
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    if sl.get_dtype() == "I8":
                        i8 += n
                    elif k.endswith(".SCB"):
                        scb += n * 4
    return {"checkpoint_bytes": total, "int8_weights": i8, "scb_bytes": scb,
            "bytes_per_int8_weight": (i8 + scb) / i8 if i8 else None}


class Replay(torch.nn.Module):
    """Stands in for the FP32 reference in llmq.evaluate: returns the FP32 row's stored logits, window by
    window, after checking that the window's token ids are the stored ones."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder, self.i = folder, 0

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        from safetensors.torch import load_file

        d = load_file(str(self.folder / f"{self.i:04d}.safetensors"))
        if not torch.equal(d["ids"], input_ids[0].cpu()):
            raise RuntimeError(f"stored FP32 logits of window {self.i} are for other tokens; rerun the fp32 row")
        self.i += 1
        return SimpleNamespace(logits=d["logits"][None])


def reference(work: Path, cfg: dict[str, Any], fp):
    store = work / f"ref-{_eval_key(cfg)}"
    return Replay(store) if (store / "DONE").is_file() else fp


def _eval_key(cfg: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(cfg["evaluation"], sort_keys=True).encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------------------ rows
def _eval_ids(tok, cfg: dict[str, Any], max_tokens: int | None) -> torch.Tensor:
    from llmq.data import load_text, tokenize

    return tokenize(tok, load_text(cfg["evaluation"]["data"], "evaluation"), max_tokens=max_tokens)


def _calib_windows(tok, cal: dict[str, Any]) -> torch.Tensor:
    from llmq.data import calibration_windows, load_text, tokenize

    ids = tokenize(tok, load_text(cal["source"], "calibration"))
    return calibration_windows(ids, cal["samples"], cal["seq_len"], cal["seed"])


def _half(cfg: dict[str, Any]) -> str:
    from llmq.load import resolve_device

    if cfg["half_dtype"] != "auto":
        return cfg["half_dtype"]
    return "float16" if resolve_device(cfg["device"]).type == "cuda" else "bfloat16"


def _common(out: dict[str, Any], model, tok, fp, cfg: dict[str, Any], work: Path, progress: bool):
    """Checkpoint bytes, full evaluation vs the FP32 reference, and the interleaved speed measurement.
    `fp`: the FP32 model, or a function loading it, called after the evaluation (so the row's peak memory is
    its model's alone) unless the fp32 row's stored logits are missing. Returns the FP32 model."""
    from llmq.config import Evaluation
    from llmq.evaluate import evaluate  # not llmq.evaluate: once imported, that name is the submodule

    ev_cfg = Evaluation(**cfg["evaluation"])
    ref = None if model is fp else reference(work, cfg, None)
    if ref is None and model is not fp:  # no stored FP32 logits: the live FP32 model, resident beside the row's
        fp = ref = fp() if callable(fp) else fp
    out["reference"] = None if ref is None else ("replayed fp32 logits" if isinstance(ref, Replay) else "fp32")
    ev = evaluate(model, tok, ev_cfg, reference=ref, reference_name="fp32", progress=progress)
    fp = fp() if callable(fp) else fp
    out.update(checkpoint_stats(model, tok))
    out["fp16_bytes"] = 2 * sum(p.numel() for p in fp.parameters())
    out["eval"] = ev.to_dict()
    ids = _eval_ids(tok, cfg, ev_cfg.max_tokens)
    out["speed"] = speed(model, fp, ids, ev_cfg.seq_len, cfg["timing"]["speed_windows"])
    return fp


def row_fp(row: dict[str, Any], cfg: dict[str, Any], model_id: str, work: Path, progress: bool) -> dict:
    from llmq.load import load

    dtype = _half(cfg) if row["dtype"] == "half" else row["dtype"]
    t0 = time.perf_counter()
    m, tok = load(model_id, dtype=dtype, device=cfg["device"])
    out: dict[str, Any] = {"dtype": dtype, "load_seconds": time.perf_counter() - t0}
    fp = m if dtype == "float32" else (lambda: load(model_id, dtype="float32", device=cfg["device"])[0])
    _common(out, m, tok, fp, cfg, work, progress)
    if dtype == "float32":  # the bare loop over every evaluation window; its logits become the reference
        ev = cfg["evaluation"]
        ids = _eval_ids(tok, cfg, ev["max_tokens"])
        store = work / f"ref-{_eval_key(cfg)}"
        store.mkdir(parents=True, exist_ok=True)
        (store / "DONE").unlink(missing_ok=True)
        from safetensors.torch import save_file

        seconds, fed = 0.0, 0
        for i, w in enumerate(torch.split(ids, ev["seq_len"])):
            if w.numel() < 2:
                continue
            dt, logits = bare(m, w)
            seconds, fed = seconds + dt, fed + w.numel()
            save_file({"ids": w.contiguous(), "logits": logits[0].float().cpu().contiguous()},
                      str(store / f"{i:04d}.safetensors"))
        (store / "DONE").write_text("ok\n")
        out["bare_all_windows"] = {"tokens_per_s": fed / seconds, "seconds": seconds, "tokens": fed,
                                   "evaluator_over_bare": out["eval"]["tokens_per_second"] * seconds / fed}
    return out


def row_llmq(row: dict[str, Any], cfg: dict[str, Any], model_id: str, work: Path, progress: bool) -> dict:
    import llmq
    from llmq.load import load, load_config
    from llmq.memory import PeakMemory

    path = ROOT / row["recipe"].format(model_type=load_config(model_id).model_type)
    if not path.is_file():
        return {"skipped": f"no recipe {path.relative_to(ROOT)} for this model family"}
    cal = cfg["calibration"]
    sets = {"model": model_id, "device": cfg["device"],
            **{f"calibration.{k}": v for k, v in cal.items()},
            **{f"evaluation.{k}": v for k, v in cfg["evaluation"].items()}, **row.get("set", {})}
    recipe = llmq.Recipe.from_yaml(path).override(sets)
    t0 = time.perf_counter()
    m, tok = load(model_id, dtype=recipe.dtype, device=recipe.device)
    out: dict[str, Any] = {"recipe": recipe.to_dict(), "recipe_file": str(path.relative_to(ROOT)),
                           "load_seconds": time.perf_counter() - t0}
    cal_windows = _calib_windows(tok, cal)
    windows = cal_windows if recipe.quantization.method == "smoothquant" else None
    _touch(m)
    gc.collect()
    with PeakMemory(next(m.parameters()).device) as pm:
        t0 = time.perf_counter()
        report, stats = llmq.quantize_model_(m, tok, recipe, windows=windows, progress=progress)
        seconds = time.perf_counter() - t0
    if stats is not None and stats.samples:  # auto alpha: the simulated rows reuse this calibration
        sm = recipe.smoothing
        _save_stats(stats, _stats_path(work, cal, sm.groups, sm.auto_tokens))
    alphas = report.get("alphas") or {}
    out["quantize"] = {"seconds": seconds, **_peak(pm), "calibrated": windows is not None,
                       "alpha": report["alpha"], "threshold": report["threshold"],
                       "mean_alpha": statistics.mean(alphas.values()) if alphas else None,
                       "alphas": alphas}
    fp = _common(out, m, tok, lambda: load(model_id, dtype="float32", device=recipe.device)[0], cfg, work, progress)
    out["fp_calibration_forward"] = fp_calibration_forward(fp, cal_windows, cfg["timing"]["calib_forward_windows"])
    return out


@torch.no_grad()
def _touch(model) -> None:
    """Read every weight once: from_pretrained may leave them memory-mapped and not yet resident, and the
    first touch would otherwise count as quantization memory."""
    for p in model.parameters():
        p.sum()


def _peak(pm) -> dict[str, Any]:
    return {"peak_bytes": pm.peak_bytes, "baseline_bytes": pm.baseline_bytes,
            "peak_above_baseline_bytes": pm.above_baseline_bytes, "memory_kind": pm.kind,
            "peak_since_start": pm.peak_since_start}


def row_peer(row: dict[str, Any], cfg: dict[str, Any], model_id: str, work: Path, progress: bool) -> dict:
    """Stock transformers: from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from llmq.config import OFFLINE_MODEL
    from llmq.load import load, resolve_device
    from llmq.memory import PeakMemory

    if model_id == OFFLINE_MODEL:
        from llmq.assets import model_folder

        folder = str(model_folder())
    elif not model_id.lower().endswith(".gguf"):
        folder = model_id  # a local safetensors folder or a Hub id
    else:
        return {"skipped": "stock transformers + bitsandbytes needs a safetensors folder, not a .gguf"}
    dev = resolve_device(cfg["device"])
    kw: dict[str, Any] = {"dtype": torch.float16 if dev.type == "cuda" else torch.float32}
    if dev.type == "cuda":
        kw["device_map"] = {"": dev.index or 0}
    qc = BitsAndBytesConfig(load_in_8bit=True)
    gc.collect()
    with PeakMemory(dev) as pm:
        t0 = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, **kw).eval()
        seconds = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(folder)
    out: dict[str, Any] = {"folder": folder, "quantization_config": qc.to_dict(),
                           "quantize": {"seconds": seconds, **_peak(pm), "includes_loading": True,
                                        "threshold": qc.llm_int8_threshold}}
    fp = _common(out, m, tok, lambda: load(model_id, dtype="float32", device=cfg["device"])[0], cfg, work, progress)
    cal_windows = _calib_windows(tok, cfg["calibration"])
    out["fp_calibration_forward"] = fp_calibration_forward(fp, cal_windows, cfg["timing"]["calib_forward_windows"])
    return out


def row_sim(row: dict[str, Any], cfg: dict[str, Any], model_id: str, work: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from llmq.evaluate import evaluate_ids
    from llmq.load import load
    from llmq.quantize import linear_names
    from llmq.simulate import SimMode, simulated_perplexity

    sim = cfg["simulate"]
    mode = SimMode(row["act"], row["weight"])
    m, tok = load(model_id, dtype="float32", device=cfg["device"])
    ids = _eval_ids(tok, cfg, sim["max_tokens"])
    seq_len = cfg["evaluation"]["seq_len"]
    stats = _sim_stats(m, tok, cfg, work)
    names = linear_names(m, ("lm_head",))
    base = {k: v.detach().clone() for k, v in m.state_dict().items()}
    fp = evaluate_ids(m, ids, seq_len, progress=False, max_tokens=sim["max_tokens"], data=cfg["evaluation"]["data"])
    points = []
    for a in tqdm([*sim["grid"], "auto"], desc=mode.name, disable=not progress):
        t0 = time.perf_counter()
        p = simulated_perplexity(m, base, ids, seq_len, stats, mode, a, names=names, groups=sim["groups"],
                                 grid=tuple(sim["auto_grid"]))
        p["seconds"] = time.perf_counter() - t0
        if a != "auto":
            p.pop("alphas")
        points.append(p)
    return {"mode": mode.name, "act": mode.act, "weight": mode.weight, "fp_perplexity": fp.perplexity,
            "tokens": fp.tokens, "protocol": fp.protocol, "calibration_tokens": stats.tokens, "points": points}


def _stats_path(work: Path, cal: dict[str, Any], groups: Any, auto_tokens: int) -> Path:
    key = hashlib.sha1(json.dumps([cal, sorted(groups), auto_tokens], sort_keys=True).encode()).hexdigest()
    return work / f"calibration-{key[:8]}.safetensors"


def _save_stats(stats, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {**{f"max/{k}": v.contiguous() for k, v in stats.act_max.items()},
               **{f"row/{k}": v.contiguous() for k, v in stats.samples.items()},
               "tokens": torch.tensor(stats.tokens)}
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _sim_stats(m, tok, cfg: dict[str, Any], work: Path):
    """Per-channel abs-max of every linear's input plus auto_tokens rows per group. The smoothquant-auto row
    leaves exactly these (same windows, groups and seed) in the work folder; else calibrate once here."""
    from safetensors.torch import load_file

    from llmq.calibrate import CalibrationStats, calibrate
    from llmq.quantize import linear_names
    from llmq.smooth import smooth_targets

    sim, cal = cfg["simulate"], cfg["calibration"]
    path = _stats_path(work, cal, sim["groups"], sim["auto_tokens"])
    names = linear_names(m, ("lm_head",))
    if path.is_file():
        d = load_file(str(path))
        stats = CalibrationStats(act_max={k[4:]: v for k, v in d.items() if k.startswith("max/")},
                                 samples={k[4:]: v for k, v in d.items() if k.startswith("row/")},
                                 tokens=int(d["tokens"]))
        if set(names) <= set(stats.act_max):
            return stats
    targets = smooth_targets(m, sim["groups"])
    stats = calibrate(m, _calib_windows(tok, cal), names, sample_names=tuple(t.linear_names[0] for t in targets),
                      sample_tokens=sim["auto_tokens"], seed=cal["seed"], progress=False)
    _save_stats(stats, path)
    return stats


RUNNERS = {"fp": row_fp, "llmq": row_llmq, "peer": row_peer, "sim": row_sim}


def run_row(cfg: dict[str, Any], model_id: str, name: str, work: Path, progress: bool) -> dict[str, Any]:
    row = next((r for r in row_list(cfg) if r["name"] == name), None)
    if row is None:
        raise SystemExit(f"unknown row {name!r}; rows: {[r['name'] for r in row_list(cfg)]}")
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = RUNNERS[row["kind"]](row, cfg, model_id, work, progress)
    return {"row": name, "kind": row["kind"], "spec": row, "model": model_id,
            "settings_key": settings_key(cfg, model_id, row), "wall_seconds": time.perf_counter() - t0,
            "torch_threads": torch.get_num_threads(),
            "loadavg_1min": [load0, os.getloadavg()[0]], **out}


# ---------------------------------------------------------------------------------------- driver
def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def drive(cfg: dict[str, Any], args: argparse.Namespace, model_id: str, command: str) -> dict[str, Any]:
    work = Path(args.work_dir) / slug(model_id)
    work.mkdir(parents=True, exist_ok=True)
    rows = [r for r in row_list(cfg) if not args.rows or r["name"] in args.rows]
    (work / "command.txt").write_text(command + "\n", encoding="utf-8")  # --report-only quotes it
    results = {}
    for i, row in enumerate(rows, 1):
        path = work / f"{row['name']}.json"
        key = settings_key(cfg, model_id, row)
        old = json.loads(path.read_text()) if path.is_file() else None
        if old and old.get("settings_key") == key and not args.force:
            print(f"[{i}/{len(rows)}] {row['name']}: kept {path} (same settings; --force reruns)", flush=True)
            results[row["name"]] = old
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--model", model_id,
               "--row", row["name"], "--json", str(path), "--work-dir", args.work_dir, *_overrides(args)]
        print(f"[{i}/{len(rows)}] {row['name']}: running (load {os.getloadavg()[0]:.1f}) ...", flush=True)
        t0 = time.perf_counter()
        logf = work / f"{row['name']}.log"
        with open(logf, "w") as f:
            rc = subprocess.run(cmd, stdout=None if args.verbose else f, stderr=None if args.verbose else f,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, cwd=ROOT).returncode
        if rc != 0:
            tail = "" if args.verbose else "\n".join(logf.read_text().splitlines()[-15:])
            raise SystemExit(f"row {row['name']} failed (exit {rc}); log {logf}:\n{tail}")
        results[row["name"]] = json.loads(path.read_text())
        print(f"    done in {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def _overrides(args: argparse.Namespace) -> list[str]:
    out = []
    for k in ("max_tokens", "seq_len", "calib_samples", "sim_max_tokens", "threads"):
        if getattr(args, k) is not None:
            out += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return out + (["--verbose"] if args.verbose else [])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/bench.yaml")
    p.add_argument("--model", action="append", help="model(s) to benchmark (default: the config's)")
    p.add_argument("--out-dir", default="docs", help="JSON, markdown and img/ go here")
    p.add_argument("--work-dir", default="out/bench", help="per-row JSON and logs, stored FP32 logits")
    p.add_argument("--rows", type=lambda s: s.split(","), help="comma-separated subset of row names")
    p.add_argument("--force", action="store_true", help="rerun rows whose JSON exists with the same settings")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from existing rows")
    p.add_argument("--keep-logits", action="store_true", help="keep the stored FP32 logits after the run")
    p.add_argument("--max-tokens", type=int, help="evaluation tokens (default from the config: 20480)")
    p.add_argument("--seq-len", type=int, help="evaluation window (default from the config: 1024)")
    p.add_argument("--calib-samples", type=int, help="calibration windows (default from the config: 64)")
    p.add_argument("--sim-max-tokens", type=int, help="simulation evaluation tokens (config: 4096)")
    p.add_argument("--threads", type=int, help="torch threads per row (default: torch's, one per core)")
    p.add_argument("--verbose", action="store_true", help="show each row's output instead of logging it")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    cfg = load_config(args.config, args)
    models = args.model or [cfg["model"]]
    if args.row:
        if args.threads:
            torch.set_num_threads(args.threads)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        write_json(Path(args.json), run_row(cfg, models[0], args.row, Path(args.work_dir) / slug(models[0]),
                                            args.verbose))
        return
    import bench_report

    command = shlex.join(["python", "scripts/benchmark.py", *(argv if argv is not None else sys.argv[1:])])
    for model_id in models:
        work = Path(args.work_dir) / slug(model_id)
        if args.report_only:
            results = {r["name"]: json.loads((work / f"{r['name']}.json").read_text()) for r in row_list(cfg)
                       if (work / f"{r['name']}.json").is_file()}
            ran = (work / "command.txt").read_text().strip() if (work / "command.txt").is_file() else command
        else:
            results, ran = drive(cfg, args, model_id, command), command
        paths = bench_report.write(results, cfg, model_id, slug(model_id), Path(args.out_dir), machine(), ran)
        print("wrote " + ", ".join(str(p) for p in paths))
        if not args.keep_logits and not args.report_only and not args.rows:
            import shutil

            for d in (Path(args.work_dir) / slug(model_id)).glob("ref-*"):
                shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
