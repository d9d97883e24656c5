"""One benchmark row, measured in its own process: FP, llmq, the stock transformers peer, and decode rows
(scripts/bench_sim.py has the simulated ones). Every number comes from llmq's public functions."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from bench_config import BenchConfig, dtype_name

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------- measuring
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


def speed(model, fp, ids: torch.Tensor, seq_len: int, n: int) -> dict[str, Any]:
    """Interleaved on the same windows, after one warm-up window each: the evaluator on the row model and on
    the FP32 model, and a bare model(ids) loop on the row model. Medians of per-window tokens/s."""
    from bench_report import speed_summary

    from llmq.evaluate import evaluate_ids

    wins = [w for w in torch.split(ids, seq_len) if w.numel() == seq_len] or [ids]
    warm, wins = wins[0], (wins[1:n + 1] or wins[:1])
    bare(model, warm)
    if fp is not model:
        bare(fp, warm)
    per: dict[str, list[float]] = {"row_eval": [], "row_eval_wall": [], "fp_eval": [], "row_bare": []}
    for i, w in enumerate(wins):
        for s in (["row", "fp", "bare"] if i % 2 == 0 else ["bare", "fp", "row"]):
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
    return {"windows": len(wins), "tokens_per_window": int(wins[0].numel()), "per_window": per,
            **speed_summary(per)}


def fp_calibration_forward(fp, windows: torch.Tensor, n: int) -> dict[str, Any]:
    """One FP forward over all calibration windows, estimated as mean(window time of the first n) x windows."""
    times = [bare(fp, w)[0] for w in windows[: max(1, n)]]
    return {"seconds": statistics.mean(times) * windows.shape[0], "timed_windows": len(times),
            "windows": int(windows.shape[0]), "tokens": int(windows.numel())}


def checkpoint_stats(model, tok, keep: Path | None = None) -> dict[str, Any]:
    """Save with llmq.save_checkpoint (into `keep`, or a temporary folder); safetensors bytes and int8 layout."""
    import tempfile

    from safetensors import safe_open

    from llmq.save import save_checkpoint

    with tempfile.TemporaryDirectory(prefix="llmq-bench-", dir=keep.parent if keep else None) as d:
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
        if keep is not None:  # for the decode rows, which load it as users do
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(d, keep)
            (keep / "DONE").write_text("ok\n")
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


def ref_store(work: Path, cfg: BenchConfig, data: str) -> Path:
    ev = cfg.evaluation
    key = json.dumps({"data": data, "seq_len": ev.seq_len, "max_tokens": ev.max_tokens}, sort_keys=True)
    return work / f"ref-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def eval_ids(tok, data: str, max_tokens: int | None) -> torch.Tensor:
    from llmq.data import load_text, tokenize

    return tokenize(tok, load_text(data, "evaluation"), max_tokens=max_tokens)


def calib_recipe(cfg: BenchConfig, seed: int | None = None):
    import llmq

    sets = cfg.calibration.recipe_keys() | ({} if seed is None else {"calibration.seed": seed})
    return llmq.Recipe(device=cfg.device).override(sets)


def quality(model, tok, fp, cfg: BenchConfig, work: Path, seed: int, progress: bool) -> list[dict[str, Any]]:
    """llmq.evaluate on every configured text, against the FP32 row's stored logits (or the live FP32 model)."""
    from llmq.config import Evaluation
    from llmq.evaluate import evaluate  # not llmq.evaluate: once imported, that name is the submodule

    out = []
    for data in cfg.evaluation.texts:
        ev = Evaluation(data=data, seq_len=cfg.evaluation.seq_len, max_tokens=cfg.evaluation.max_tokens)
        store = ref_store(work, cfg, data)
        ref = None if model is fp else (Replay(store) if (store / "DONE").is_file() else fp)
        r = evaluate(model, tok, ev, reference=ref, reference_name="fp32", progress=progress).to_dict()
        r["reference_kind"] = None if ref is None else ("replayed fp32 logits" if ref is not fp else "fp32")
        out.append({"seed": seed, **r})
    return out


def _common(out: dict[str, Any], model, tok, fp, cfg: BenchConfig, work: Path, progress: bool,
            seed: int, keep: Path | None = None) -> None:
    """Checkpoint bytes, evaluation on every text vs the FP32 reference, the interleaved speed measurement."""
    out.update(checkpoint_stats(model, tok, keep))
    out["fp16_bytes"] = 2 * sum(p.numel() for p in fp.parameters())
    out["quality"] = quality(model, tok, fp, cfg, work, seed, progress)
    out["eval"], out["reference"] = out["quality"][0], out["quality"][0]["reference_kind"]
    ev = cfg.evaluation
    out["speed"] = speed(model, fp, eval_ids(tok, ev.data, ev.max_tokens), ev.seq_len, cfg.timing.speed_windows)


# ------------------------------------------------------------------------------------------ rows
def row_fp(row: dict, cfg: BenchConfig, model_id: str, work: Path, progress: bool) -> dict[str, Any]:
    from safetensors.torch import save_file

    from llmq.load import load

    dtype = dtype_name(cfg, row["dtype"])
    t0 = time.perf_counter()
    m, tok = load(model_id, dtype=dtype, device=cfg.device)
    out: dict[str, Any] = {"dtype": dtype, "load_seconds": time.perf_counter() - t0}
    fp = m if dtype == "float32" else load(model_id, dtype="float32", device=cfg.device)[0]
    if dtype == "float32":  # the bare loop over every window of every text; its logits become the reference
        ev = cfg.evaluation
        for data in ev.texts:
            store = ref_store(work, cfg, data)
            store.mkdir(parents=True, exist_ok=True)
            (store / "DONE").unlink(missing_ok=True)
            seconds, fed = 0.0, 0
            for i, w in enumerate(torch.split(eval_ids(tok, data, ev.max_tokens), ev.seq_len)):
                if w.numel() < 2:
                    continue
                dt, logits = bare(m, w)
                seconds, fed = seconds + dt, fed + w.numel()
                save_file({"ids": w.contiguous(), "logits": logits[0].float().cpu().contiguous()},
                          str(store / f"{i:04d}.safetensors"))
            (store / "DONE").write_text("ok\n")
            if data == ev.data:
                out["bare_all_windows"] = {"tokens_per_s": fed / seconds, "seconds": seconds, "tokens": fed}
    _common(out, m, tok, fp, cfg, work, progress, cfg.calibration.seed)
    if "bare_all_windows" in out:
        b = out["bare_all_windows"]
        b["evaluator_over_bare"] = out["eval"]["tokens_per_second"] * b["seconds"] / b["tokens"]
    return out


def _quantize(model_id: str, recipe, cfg: BenchConfig, progress: bool):
    """Load, then time what `llmq quantize` does in memory (llmq.run.quantize_checked_: calibration windows
    from the library's own function, the guard of auto alpha included)."""
    from bench_api import calibration_windows

    from llmq.load import load
    from llmq.memory import PeakMemory
    from llmq.run import quantize_checked_

    t0 = time.perf_counter()
    m, tok = load(model_id, dtype=recipe.dtype, device=recipe.device)
    load_s = time.perf_counter() - t0
    cal_windows = calibration_windows(tok, recipe)
    q = recipe.quantization  # the output depends on the calibration windows: smoothing maxima, GPTQ Hessians
    calibrating = (q.method == "smoothquant" and recipe.smoothing.alpha != 0.0) or q.gptq or q.max_kl is not None
    with torch.no_grad():  # read every weight once: from_pretrained may leave them memory-mapped
        for p in m.parameters():
            p.sum()
    gc.collect()
    with PeakMemory(next(m.parameters()).device) as pm:
        t0 = time.perf_counter()
        m, report, stats = quantize_checked_(m, tok, recipe, progress=progress)
        seconds = time.perf_counter() - t0
    return m, tok, report, stats, {"seconds": seconds, **_peak(pm), "calibrated": calibrating,
                                   "load_seconds": load_s}, cal_windows


def row_llmq(row: dict, cfg: BenchConfig, model_id: str, work: Path, progress: bool) -> dict[str, Any]:
    from bench_sim import save_stats, stats_path

    import llmq
    from llmq.load import load, load_config

    path = ROOT / row["recipe"].format(model_type=load_config(model_id).model_type)
    if not path.is_file():
        return {"skipped": f"no recipe {path.relative_to(ROOT)} for this model family"}
    ev = cfg.evaluation
    sets = {"model": model_id, "device": cfg.device, **cfg.calibration.recipe_keys(),
            "evaluation.data": ev.data, "evaluation.seq_len": ev.seq_len, "evaluation.max_tokens": ev.max_tokens,
            **(row.get("set") or {})}
    recipe = llmq.Recipe.from_yaml(path).override(sets)
    m, tok, report, stats, q, cal_windows = _quantize(model_id, recipe, cfg, progress)
    out: dict[str, Any] = {"recipe": recipe.to_dict(), "recipe_file": str(path.relative_to(ROOT)),
                           "load_seconds": q.pop("load_seconds")}
    # W8A8 auto alpha: the simulated rows reuse this calibration (weight-only's was propagated through other int8)
    if stats is not None and stats.samples and recipe.quantization.method == "smoothquant":
        sm = recipe.smoothing
        save_stats(stats, stats_path(work, cfg.calibration, sm.groups, sm.auto_tokens))
    alphas = report.alphas or {}
    out["quantize"] = {**q, "alpha": report.alpha, "threshold": report.threshold, "guard": report.guard,
                       "storage": report.storage, "rotation": report.rotation,  # None: not rotated (auto decides)
                       "mean_alpha": statistics.mean(alphas.values()) if alphas else None, "alphas": alphas}
    fp, _ = load(model_id, dtype="float32", device=recipe.device)
    out["fp_calibration_forward"] = fp_calibration_forward(fp, cal_windows, cfg.timing.calib_forward_windows)
    keep = work / f"ckpt-{row['name']}" if row["name"] in cfg.decode.rows else None
    _common(out, m, tok, fp, cfg, work, progress, cfg.calibration.seed, keep)
    if q["calibrated"]:  # the spread over calibration seeds: quantize again with each, quality only
        for seed in cfg.calibration.spread_seeds:
            del m
            gc.collect()
            r = recipe.override({"calibration.seed": seed})
            m, tok, rep, _, qs, _ = _quantize(model_id, r, cfg, progress)
            out["quality"] += quality(m, tok, fp, cfg, work, seed, progress)
            out.setdefault("spread", []).append({"seed": seed, "seconds": qs["seconds"], "alphas": rep.alphas,
                                                 "guard": rep.guard, "storage": rep.storage})
    return out


def _peak(pm) -> dict[str, Any]:
    return {"peak_bytes": pm.peak_bytes, "baseline_bytes": pm.baseline_bytes,
            "peak_above_baseline_bytes": pm.above_baseline_bytes, "memory_kind": pm.kind,
            "peak_since_start": pm.peak_since_start}


def row_peer(row: dict, cfg: BenchConfig, model_id: str, work: Path, progress: bool) -> dict[str, Any]:
    """Stock transformers: from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))."""
    from bench_api import calibration_windows
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
    dev = resolve_device(cfg.device)
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
    fp, _ = load(model_id, dtype="float32", device=cfg.device)
    cal_windows = calibration_windows(tok, calib_recipe(cfg))
    out["fp_calibration_forward"] = fp_calibration_forward(fp, cal_windows, cfg.timing.calib_forward_windows)
    keep = work / f"ckpt-{row['name']}" if row["name"] in cfg.decode.rows else None
    _common(out, m, tok, fp, cfg, work, progress, cfg.calibration.seed, keep)
    return out


def row_decode(row: dict, cfg: BenchConfig, model_id: str, work: Path, progress: bool) -> dict[str, Any]:
    """The source row's saved int8 checkpoint, loaded as users load it with each `rest` dtype for its
    non-int8 parts, timed at decode interleaved with the FP `bases` (llmq.speed.compare_decode)."""
    from llmq.load import load
    from llmq.speed import Decode, compare_decode, prompt_ids

    ckpt = work / f"ckpt-{row['source']}"
    if not (ckpt / "DONE").is_file():
        raise SystemExit(f"{ckpt} is missing: run row {row['source']} first (the driver does)")
    d = cfg.decode
    dcfg = Decode(data=cfg.evaluation.data, prompt_tokens=d.prompt_tokens, new_tokens=d.new_tokens,
                  repeats=d.repeats, warmup=d.warmup)
    models, tok = {}, None
    for b in d.bases:
        models[dtype_name(cfg, b)], tok = load(model_id, dtype=dtype_name(cfg, b), device=cfg.device)
    for r in d.rest:
        models[f"{row['source']}+{dtype_name(cfg, r)}"] = load(str(ckpt), dtype=dtype_name(cfg, r),
                                                               device=cfg.device)[0]
    res = compare_decode(models, prompt_ids(tok, dcfg), dcfg, data=dcfg.data, progress=progress)
    return {"source": row["source"], "checkpoint": str(ckpt), "bases": [dtype_name(cfg, b) for b in d.bases],
            "results": {k: v.to_dict() for k, v in res.items()}}


def run_row(cfg: BenchConfig, model_id: str, row: dict, work: Path, progress: bool) -> dict[str, Any]:
    from bench_config import settings_key
    from bench_sim import row_sim

    runners = {"fp": row_fp, "llmq": row_llmq, "peer": row_peer, "decode": row_decode, "sim": row_sim}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = runners[row["kind"]](row, cfg, model_id, work, progress)
    return {"row": row["name"], "kind": row["kind"], "spec": row, "model": model_id,
            "settings_key": settings_key(cfg, model_id, row), "wall_seconds": time.perf_counter() - t0,
            "torch_threads": torch.get_num_threads(), "loadavg_1min": [load0, os.getloadavg()[0]], **out}
