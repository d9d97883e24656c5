"""A quantization run: preflight (every input that can be checked without the model fails first), the typed
Report, the atomic output folder, and the in-memory driver, which runs llmq/stage.py on the whole model:

    load -> (rotate) -> calibrate -> smooth -> quantize -> save -> (evaluate) -> card

llmq/sequential.py is the other driver (layer by layer, for models larger than memory); both write the
same folder through `finish_output`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import __version__
from .alpha import resolve_refine
from .arch import check_int8_supported, layers_path
from .calibrate import CalibrationStats, load_act_scales, resolve_statistic, save_act_scales, saved_stats
from .config import Recipe
from .data import bos_id, calibration_set, load_text
from .errors import ConfigError
from .layers import catch_inputs, quantize_layers_
from .load import check_seq_len, load, load_config
from .memory import PeakMemory, release
from .quantize import check_skip_matches, linear_names, mark_quantized_, replace_linears_
from .report import QuantizeInfo, Report
from .rotate import auto_rotate, check_rotatable, rotate_, unguarded_rotate
from .save import atomic_dir, check_output, save_checkpoint
from .stage import BlockResult, block_report, check_scales, full_pass, needs_windows, quantize_block_, smoothing_targets
from .storage import to_storage_dtype_

log = logging.getLogger(__name__)


def versions() -> dict[str, str]:
    import bitsandbytes
    import transformers

    return {"llmq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__}


@dataclass
class Inputs:
    """What preflight read: the resolved destination, the calibration text and the --act-scales maxima."""

    dest: Path
    cal_text: str | None
    scales: CalibrationStats | None


def preflight(recipe: Recipe, out: str | Path, overwrite: bool, evaluate: bool = False) -> Inputs:
    """Fail in the first second on a bad output, text source or --act-scales, before any model loads."""
    dest = check_output(out, overwrite)
    cal = recipe.calibration
    text = load_text(cal.source, "calibration") if needs_windows(recipe) else None
    scales = given_scales(recipe, None)
    check_rotated(scales, recipe)
    if evaluate:
        load_text(recipe.evaluation.data, "evaluation")  # a bad eval source fails now, not after quantizing
    return Inputs(dest, text, scales)


def check_rotated(scales: CalibrationStats | None, recipe: Recipe) -> None:
    """ConfigError when --act-scales were measured with --rotate and this run is without it, or the reverse:
    the maxima belong to other channels."""
    rotate = recipe.quantization.rotate
    if scales is not None and rotate != "auto" and scales.rotated != rotate:  # auto follows them (auto_rotate)
        raise ConfigError(f"--act-scales {recipe.calibration.act_scales!r} were measured "
                          f"{'with' if scales.rotated else 'without'} --rotate and this run is "
                          f"{'with' if rotate else 'without'} it, so they describe other channels; "
                          f"{'add' if scales.rotated else 'drop'} --rotate, or recalibrate without --act-scales")


def stamp_(report: Report, recipe: Recipe, command: str) -> Report:
    """Fill in where the run came from and with which versions."""
    from .provenance import provenance

    prov = provenance(recipe, command)
    report.llmq_version, report.versions = __version__, versions()
    report.base_model, report.license, report.command = prov["base_model"], prov["license"], prov["command"]
    return report


def finish_output(tmp: Path, recipe: Recipe, report: Report, stats: CalibrationStats | None) -> None:
    """The files every llmq output folder has beside the weights: act scales, recipe, report, card."""
    from .card import write_card

    if stats is not None:
        save_act_scales(stats, tmp / "act_scales.safetensors")
    from .provenance import public, public_recipe

    (tmp / "llmq_recipe.yaml").write_text(public_recipe(recipe).to_yaml(), encoding="utf-8")
    report.write(tmp, public)
    write_card(tmp, recipe.push.repo_id)


def given_scales(recipe: Recipe, scales: CalibrationStats | None) -> CalibrationStats | None:
    """`scales`, else the recipe's --act-scales file where the run reads calibration text, else None."""
    if scales is None and recipe.calibration.act_scales and needs_windows(recipe):
        asked = recipe.calibration.statistic
        return load_act_scales(recipe.calibration.act_scales, None if asked == "auto" else asked)
    return scales


def resolve_rotate(model, recipe: Recipe, scales: CalibrationStats | None) -> tuple[Recipe, str | None]:
    """`recipe` with `quantization.rotate: auto` decided for `model` (llmq/rotate.py `auto_rotate`) and the
    --act-scales `scales`, and why (None when the recipe said true or false)."""
    q = recipe.quantization
    if q.rotate != "auto":
        return recipe, None
    on, why = auto_rotate(model, recipe, scales)
    log.info("rotate auto: %s (%s)", "on" if on else "off", why)
    return replace(recipe, quantization=replace(q, rotate=on)), why


def quantize_model_(model, tokenizer, recipe: Recipe, *, windows: torch.Tensor | None = None,
                    scales: CalibrationStats | None = None,
                    progress: bool = True) -> tuple[Report, CalibrationStats | None]:
    """Smooth (smoothquant, weight-only) and replace the linears with Int8 modules, in place; see `_quantize_`.
    Returns the report's quantization fields and the calibration statistics to save (None without).
    `quantization.rotate: auto` means off here (no guard to check it), unless the --act-scales were rotated."""
    check_skip_matches([n for n, _ in model.named_modules()], recipe.quantization.skip)
    scales = given_scales(recipe, scales)
    recipe = resolve_refine(resolve_statistic(recipe, scales), False)  # auto: no guard here to try the window mean
    rotate = unguarded_rotate(recipe.quantization.rotate, scales)
    recipe = replace(recipe, quantization=replace(recipe.quantization, rotate=rotate))
    report, stats, _ = _quantize_(model, tokenizer, recipe, windows=windows, scales=scales, progress=progress)
    return report, stats


def _quantize_(model, tokenizer, recipe: Recipe, *, windows: torch.Tensor | None = None,
               scales: CalibrationStats | None = None,
               progress: bool = True) -> tuple[Report, CalibrationStats | None, BlockResult]:
    """Smooth (llmq/stage.py's `smooths`) and replace the linears with Int8 modules, in place. With calibration
    text (smoothing, GPTQ, --max-kl) llmq/stage.py runs layer by layer on the calibration windows
    (llmq/layers.py, as the sequential driver does); otherwise once on the whole model. Also returns the
    stage's BlockResult."""
    q, cal = recipe.quantization, recipe.calibration
    targets = smoothing_targets(model, recipe)
    check_rotated(scales, recipe)
    rotation = rotate_(model) if q.rotate else None  # before calibration; module names and shapes do not change
    check_scales(scales, targets, cal.act_scales)
    qnames = linear_names(model, q.skip)
    if needs_windows(recipe):
        if windows is None:
            windows = calibration_set(tokenizer, cal)
        windows = windows if full_pass(recipe, scales is not None) else windows[:1]
        path, device = layers_path(model), next(model.parameters()).device
        hidden, extras = catch_inputs(model, model.get_submodule(path), windows, device, device)
        res = quantize_layers_(model, path, recipe, targets, qnames, hidden=hidden, extras=extras,
                               seq_len=windows.shape[1], scales=scales, device=device, progress=progress)
        del hidden, extras
        replace_linears_(model, [n for n in qnames if not n.startswith(path + ".")], q)
    else:
        res = quantize_block_(model, recipe, [], qnames, ids=None,
                              check_ids=None if windows is None else windows[:1], progress=progress)
    mark_quantized_(model, q)
    # what stock from_pretrained reloads; checked and evaluated as such
    storage = to_storage_dtype_(model, q.storage_dtype, res.act_range)
    report, stats = block_report(recipe, res), saved_stats(scales, res, recipe.calibration.statistic)
    report.storage = storage
    report.rotation = rotation
    if stats is not None:
        stats.rotated = q.rotate
    return report, stats, res


def calibration_split(tokenizer, recipe: Recipe, text: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(calibration windows, the guard's held-out windows): `samples` windows calibrate; with auto alpha,
    `smoothing.guard_windows` more are drawn from the same text and held out (None when not guarding)."""
    if not needs_windows(recipe):
        return None, None
    from .guard import split_windows

    sm = recipe.smoothing
    g = sm.guard_windows if sm.alpha == "auto" or recipe.quantization.max_kl is not None else 0
    if recipe.quantization.max_kl is not None and g == 0:
        raise ConfigError("--max-kl measures KL on held-out calibration windows; set smoothing.guard_windows "
                          "to 1 or more")
    cal = replace(recipe.calibration, samples=recipe.calibration.samples + g)
    windows, held = split_windows(calibration_set(tokenizer, cal, text), g)
    return windows, (held if g else None)


def _checked_(model, tok, recipe: Recipe, windows, held, scales, built: tuple, both: bool, progress: bool = False):
    """The end-to-end checks of llmq/guard.py on the in-memory model `built` = (report, stats, BlockResult):
    auto against its rivals (`both`: auto under the window mean among them), then --max-kl. Returns the model to
    ship, its report and statistics."""
    from .guard import guard_, keep_sensitive_, reference_logits

    (report, stats, res), q = built, recipe.quantization

    def load_fp():
        return load(recipe.model, dtype=recipe.dtype, device=recipe.device,
                    trust_remote_code=recipe.trust_remote_code)[0]

    def build(rec: Recipe):
        m = load_fp()
        same = rec.quantization.rotate == recipe.quantization.rotate  # else its own maxima (guard.rivals)
        return m, _quantize_(m, tok, rec, windows=windows, scales=scales if same else None, progress=False)

    guarded = recipe.smoothing.alpha == "auto" and (report.alphas or q.rotate)  # smoothquant, or weight-only
    fp = load_fp() if guarded or q.max_kl is not None else None  # the float reference of held-out KL
    ref = reference_logits(fp, held) if guarded else None  # its logits in a temporary file, or fp if smaller
    fp = fp if q.max_kl is not None or ref is fp else None  # else not beside the rivals
    release()
    try:
        if guarded:
            model, won, result = guard_(model, recipe, held, ref, build, window_mean=both)
            if won is not None:
                alpha, auto_stats, auto_alphas = report.alpha, stats, report.alphas
                report, stats, res = won
                report.alpha = alpha  # as asked ("auto"); the alphas are the rival's
                if not report.alphas and auto_alphas:  # weight-only alpha 0 rescales nothing: every group at 0
                    report.alphas = dict.fromkeys(auto_alphas, 0.0)
                stats = stats or auto_stats  # the maxima auto calibrated stay reusable (--act-scales)
            report.guard = {"chosen": result.chosen, "fell_back": result.fell_back,
                            "held_out_windows": int(held.shape[0]), "held_out_tokens": result.held_out_tokens,
                            "candidates": result.candidates}
        if q.max_kl is not None:
            report.keep = keep_sensitive_(model, held, fp, q, res, windows[:q.rank_windows], progress)
    finally:
        if ref is not None and ref is not fp:
            ref.close()
    return model, report, stats


def quantize_checked_(model, tokenizer, recipe: Recipe, *, text: str | None = None,
                      scales: CalibrationStats | None = None, progress: bool = True):
    """What `llmq quantize` does to the in-memory model: calibrate on `calibration.samples` windows, quantize
    in place, then the end-to-end checks on held-out windows (the guard of auto alpha, --max-kl). Returns
    (the model to ship: `model` or a rival the guard chose, its report fields, its statistics to save)."""
    check_skip_matches([n for n, _ in model.named_modules()], recipe.quantization.skip)  # once, not per rival
    scales = given_scales(recipe, scales)
    both = recipe.calibration.statistic == "auto" and scales is None  # the guard also builds the window mean
    recipe, why = resolve_rotate(model, resolve_statistic(recipe, scales), scales)
    windows, held = calibration_split(tokenizer, recipe, text)
    recipe = resolve_refine(recipe, both and held is not None)  # held-out windows: the guard builds the window mean
    built = _quantize_(model, tokenizer, recipe, windows=windows, scales=scales, progress=progress)
    model, report, stats = (model, *built[:2]) if held is None else _checked_(model, tokenizer, recipe, windows,
                                                                             held, scales, built, both, progress)
    if why is not None and report.rotation is not None:
        report.rotation["auto"] = why
    return model, report, stats


def run(recipe: Recipe, out: str | Path, *, overwrite: bool = False, evaluate: bool = False,
        command: str = "", progress: bool = True) -> Report:
    """Quantize `recipe.model` into the folder `out` (atomically); optionally evaluate FP vs INT8 there.

    Returns the report (also written to out/llmq_report.json)."""
    inputs = preflight(recipe, out, overwrite, evaluate)
    cal = recipe.calibration
    model_type = load_config(recipe.model, recipe.trust_remote_code).model_type
    check_int8_supported(model_type)  # before the weights
    if recipe.quantization.rotate is True:  # auto: only where it folds (auto_rotate)
        check_rotatable(model_type)
    model, tok = load(recipe.model, dtype=recipe.dtype, device=recipe.device,
                      trust_remote_code=recipe.trust_remote_code)
    if needs_windows(recipe):
        check_seq_len(model, cal.seq_len, "calibration.seq_len (--calib-seq-len)")
    if evaluate:
        check_seq_len(model, recipe.evaluation.seq_len, "evaluation.seq_len",
                      bos_id(tok, recipe.evaluation.bos) is not None)
    with atomic_dir(inputs.dest, overwrite) as tmp:
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        with PeakMemory(device) as pm:
            model, report, stats = quantize_checked_(model, tok, recipe, text=inputs.cal_text,
                                                     scales=inputs.scales, progress=progress)
        stamp_(report, recipe, command)
        report.quantize = QuantizeInfo(round(time.perf_counter() - t0, 3), pm.peak_bytes, pm.baseline_bytes,
                                       pm.kind, str(device))
        save_checkpoint(model, tok, tmp)
        if evaluate:
            from .compare import evaluate_quantized

            log.info("checkpoint written to %s; evaluating FP vs INT8 on %s", tmp, recipe.evaluation.data)
            del model  # each model alone in memory: FP, then the INT8 checkpoint as stock reload gives it
            report.evaluation = evaluate_quantized(recipe, tmp, tok, progress=progress)
        finish_output(tmp, recipe, report, stats)
    log.info("wrote %s", inputs.dest)
    return report
