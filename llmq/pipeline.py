"""The pipeline, visiting each stage once: load -> calibrate -> smooth -> quantize -> save -> evaluate -> push."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .calibrate import CalibrationStats, calibrate, load_act_scales, save_act_scales
from .config import Recipe
from .data import calibration_windows, load_text, tokenize
from .errors import ConfigError
from .load import check_seq_len, load
from .memory import PeakMemory
from .provenance import provenance, public_recipe
from .quantize import check_finite_weights, check_fp16_range, quantize_
from .save import atomic_dir, check_output, save_checkpoint, write_json
from .storage import to_storage_dtype_

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import bitsandbytes
    import transformers

    return {"llmq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def _calibration_windows(tokenizer, recipe: Recipe, text: str | None = None) -> torch.Tensor:
    cal = recipe.calibration
    text = load_text(cal.source, "calibration") if text is None else text
    # 8x the needed tokens leaves room for seeded sampling without tokenizing whole dataset shards
    ids = tokenize(tokenizer, text, max_tokens=8 * cal.samples * cal.seq_len)
    return calibration_windows(ids, cal.samples, cal.seq_len, cal.seed)


def quantize_model_(model, tokenizer, recipe: Recipe, *, windows: torch.Tensor | None = None,
                    progress: bool = True) -> tuple[dict[str, Any], CalibrationStats | None]:
    """Smooth (smoothquant only) and replace the linears with Int8 modules, in place.

    Returns the report fields of the quantization and the calibration statistics (None without calibration).
    """
    from .smooth import smooth_, smooth_targets

    q, sm, cal = recipe.quantization, recipe.smoothing, recipe.calibration
    check_finite_weights(model)
    report: dict[str, Any] = {"method": q.method, "threshold": q.effective_threshold, "skip": list(q.skip),
                              "alpha": None, "alphas": None, "calibration": None}
    stats = None
    if q.method == "smoothquant":
        targets = smooth_targets(model, sm.groups)
        auto = sm.alpha == "auto"
        if cal.act_scales:
            stats = load_act_scales(cal.act_scales)
            names = {n for t in targets for n in t.linear_names}
            if not names <= set(stats.act_max):
                raise ConfigError(f"--act-scales {cal.act_scales!r} does not match this model (it lacks "
                                  f"{sorted(names - set(stats.act_max))[:2]}...); recalibrate without it")
        alphas = {t.key: 0.0 for t in targets}
        if not auto and sm.alpha == 0.0 and stats is None:
            stats = CalibrationStats(act_max={})  # alpha 0 = no smoothing: nothing to calibrate
        elif auto or stats is None:
            if windows is None:
                windows = _calibration_windows(tokenizer, recipe)
            names = sorted({n for t in targets for n in t.linear_names})
            fresh = calibrate(model, windows, names,
                              sample_names=tuple(t.linear_names[0] for t in targets) if auto else (),
                              sample_tokens=sm.auto_tokens if auto else 0, seed=cal.seed, progress=progress)
            if stats is None:
                stats = fresh
            else:
                stats.samples, stats.tokens = fresh.samples, fresh.tokens
        if auto:
            from .alpha import search_alpha_

            alphas, _ = search_alpha_(model, targets, stats, sm.grid, progress=progress)
        elif sm.alpha != 0.0:
            alphas = smooth_(model, stats.act_max, sm.alpha, sm.groups)
        report.update(alpha=sm.alpha, alphas=alphas,
                      calibration={"source": cal.source, "samples": cal.samples, "seq_len": cal.seq_len,
                                   "seed": cal.seed, "tokens": stats.tokens,
                                   "act_scales": cal.act_scales})
    quantize_(model, q, progress=progress)
    to_storage_dtype_(model, q.storage_dtype)  # what stock from_pretrained reloads; checked and evaluated as such
    if stats is not None and not stats.act_max:
        stats = None  # nothing was calibrated: no act_scales file
    if windows is None and q.method == "smoothquant":
        windows = _calibration_windows(tokenizer, recipe)
    if windows is not None:
        check_fp16_range(model, windows[:1])
    return report, stats


def run(recipe: Recipe, out: str | Path, *, overwrite: bool = False, evaluate: bool = False,
        command: str = "", progress: bool = True) -> dict[str, Any]:
    """Quantize `recipe.model` into the folder `out` (atomically); optionally evaluate FP vs INT8 there.

    Returns the report (also written to out/llmq_report.json).
    """
    from .compare import evaluate_quantized
    from .smooth import smooth_targets

    dest = check_output(out, overwrite)  # fail in the first second, not after calibration
    cal = recipe.calibration
    smoothquant = recipe.quantization.method == "smoothquant"
    calibrating = smoothquant and (recipe.smoothing.alpha == "auto" or not cal.act_scales)
    # inputs that need no model fail before it loads: a bad text source, a missing --act-scales
    cal_text = load_text(cal.source, "calibration") if calibrating else None
    if smoothquant and cal.act_scales:
        load_act_scales(cal.act_scales)
    if evaluate:
        load_text(recipe.evaluation.data, "evaluation")  # a bad eval source fails now, not after quantizing
    model, tok = load(recipe.model, dtype=recipe.dtype, device=recipe.device,
                      trust_remote_code=recipe.trust_remote_code)
    if calibrating:
        check_seq_len(model, cal.seq_len, "calibration.seq_len (--calib-seq-len)")
    if evaluate:
        check_seq_len(model, recipe.evaluation.seq_len + recipe.evaluation.bos, "evaluation.seq_len")
    windows = None
    if smoothquant:
        smooth_targets(model, recipe.smoothing.groups)  # unsupported architecture: fail before calibrating
        if calibrating:
            windows = _calibration_windows(tok, recipe, cal_text)
    report: dict[str, Any] = {"llmq_version": __version__, **provenance(recipe, command), "versions": versions()}
    with atomic_dir(dest, overwrite) as tmp:
        t0 = time.perf_counter()
        with PeakMemory(next(model.parameters()).device) as pm:
            qrep, stats = quantize_model_(model, tok, recipe, windows=windows, progress=progress)
        report.update(qrep)
        report["quantize"] = {"seconds": round(time.perf_counter() - t0, 3), "peak_memory_bytes": pm.peak_bytes,
                              "baseline_memory_bytes": pm.baseline_bytes, "peak_memory_kind": pm.kind,
                              "device": str(next(model.parameters()).device)}
        save_checkpoint(model, tok, tmp)
        if stats is not None:
            save_act_scales(stats, tmp / "act_scales.safetensors")
        (tmp / "llmq_recipe.yaml").write_text(public_recipe(recipe).to_yaml(), encoding="utf-8")
        report["evaluation"] = None
        if evaluate:
            log.info("checkpoint written to %s; evaluating FP vs INT8 on %s", tmp, recipe.evaluation.data)
            del model  # each model alone in memory: FP, then the INT8 checkpoint as stock reload gives it
            report["evaluation"] = evaluate_quantized(recipe, tmp, tok, progress=progress)
        write_json(tmp / "llmq_report.json", report)
        from .hub import write_card

        write_card(tmp, recipe.push.repo_id)
    log.info("wrote %s", dest)
    return report
