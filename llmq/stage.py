"""The quantization stage: for one block (the whole model in memory, or one decoder layer fed by the
sequential driver) and the calibration inputs it is run on:

    calibrate -> choose and apply smoothing -> (quantization.a16: lay out the input ranges, llmq/a16.py)
      -> convert linears to int8 -> fp16 range check

Every per-block decision lives here once; llmq/run.py (in memory) and llmq/sequential.py (layer by layer)
both call `quantize_block_` and differ only in how they feed the block and where the weights come from.

`root` is the module names are resolved against and that `ids` are run through: the model itself (ids are
token windows), or the sequential driver's feed (ids select cached layer inputs).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibrate import CalibrationStats, calibrate
from .config import Recipe, rescales
from .errors import ConfigError
from .memory import trim_heap
from .quantize import check_finite_weights, check_fp16_range, replace_linears_
from .report import CalibrationInfo, Report
from .smooth import SmoothTarget, linear_weight, smooth_

log = logging.getLogger(__name__)


@dataclass
class BlockResult:
    """What one block's stage measured and chose."""

    act_max: dict[str, torch.Tensor] = field(default_factory=dict)  # freshly calibrated maxima (may be empty)
    alphas: dict[str, float] = field(default_factory=dict)  # per smoothing target key
    errors: dict[str, dict[str, float]] = field(default_factory=dict)  # auto: error per candidate alpha
    refined: dict[str, float] = field(default_factory=dict)  # auto: refined group -> its error / unrefined
    tokens: int = 0  # calibration tokens run through the block
    # largest |activation| the int8 layers produced on the calibration windows (llmq/layers.py; None: not
    # measured): what decides auto's storage dtype (llmq/storage.py)
    act_range: float | None = None
    layout: dict[str, int] = field(default_factory=dict)  # quantization.a16: log2 scale per group (llmq/a16.py)
    a16_count: int = 0  # quantization.a16: linears kept W8A16
    # with quantization.max_kl: each converted linear's float module (smoothed, on CPU): what --max-kl can
    # put back (llmq/guard.py ranks them by their end-to-end effect)
    originals: dict[str, nn.Module] = field(default_factory=dict)


def smooths(recipe: Recipe) -> bool:
    """Whether the run rescales input channels: llmq/config.py `rescales` for its method and alpha."""
    return rescales(recipe.quantization.method, recipe.smoothing.alpha)


def smoothing_targets(model: nn.Module, recipe: Recipe) -> list[SmoothTarget]:
    """The smoothing groups a run rescales: none unless `smooths`; for weight-only also none (said in the
    log) on a family llmq/arch.py has no table entry for, since weight-only needs none; smoothquant raises."""
    if not smooths(recipe):
        return []
    from .arch import ARCHS
    from .smooth import smooth_targets

    if recipe.quantization.method == "weight-only" and model.config.model_type not in ARCHS:
        log.info("weight-only: no smoothing table entry for %r, so no activation-aware scaling",
                 model.config.model_type)
        return []
    return smooth_targets(model, recipe.smoothing.groups)


def simulated_act(recipe: Recipe) -> str:
    """How the alpha search simulates a linear's input: per-token int8 (W8A8), or untouched (weight-only)."""
    return "none" if recipe.quantization.method == "weight-only" else "token"


def needs_windows(recipe: Recipe) -> bool:
    """Whether a run needs calibration text: every smoothquant run does (maxima, or at least window 0 for the
    fp16 range check), every rescaled weight-only run (maxima), every GPTQ run (input Hessians) and every
    --max-kl run (held-out windows)."""
    q = recipe.quantization
    return smooths(recipe) or q.gptq or q.max_kl is not None or bool(q.a16)


def full_pass(recipe: Recipe, have_scales: bool) -> bool:
    """Whether every calibration window runs through the float block (maxima, auto rows, GPTQ Hessians);
    otherwise window 0 alone is needed, for the fp16 range check (quantization.a16: every window, to measure
    the ranges llmq/a16.py lays out)."""
    q = recipe.quantization
    return collects(recipe, have_scales) or q.gptq or bool(q.a16)


def collects(recipe: Recipe, have_scales: bool) -> bool:
    """Whether the stage runs every calibration window through the float block: activation maxima for a
    fixed alpha without --act-scales, and maxima + rows for auto. Otherwise only window 0 is needed."""
    sm = recipe.smoothing
    return smooths(recipe) and (sm.alpha == "auto" or (sm.alpha != 0.0 and not have_scales))


def check_scales(scales: CalibrationStats | None, targets: list[SmoothTarget], path: str | None) -> None:
    """ConfigError when a loaded --act-scales file lacks a linear the targets smooth."""
    if scales is None:
        return
    names = {n for t in targets for n in t.linear_names}
    lacks = sorted(names - set(scales.act_max))
    if lacks:
        raise ConfigError(f"--act-scales {path!r} does not match this model (it lacks {lacks[:2]}...); "
                          "recalibrate without it")


@torch.no_grad()
def quantize_block_(root: nn.Module, recipe: Recipe, targets: list[SmoothTarget], qnames: list[str], *,
                    ids: torch.Tensor | None, check_ids: torch.Tensor | None,
                    scales: CalibrationStats | None = None, progress: bool = False,
                    layout: tuple[list[SmoothTarget], set[str]] = ([], set())) -> BlockResult:
    """Quantize the block under `root` in place: `targets` are its smoothing groups (empty unless
    smoothquant), `qnames` its linears to convert. `ids`: the calibration inputs (every window runs through
    the float block when `full_pass`); `check_ids`: the input of the fp16 range check (None: no check);
    `scales`: maxima from --act-scales; `layout`: with quantization.a16, the block's groups and a16 linears
    (llmq/a16.py `layout_targets`), rescaled after smoothing. With quantization.gptq the same float pass
    accumulates each linear's input Hessian, and the weights are rounded by llmq/gptq.py instead of
    bitsandbytes' round-to-nearest."""
    sm, cal, q = recipe.smoothing, recipe.calibration, recipe.quantization
    if sm.alpha == "auto" and sm.refine == "auto":  # a driver bug: llmq/alpha.py resolve_refine decides it
        raise ValueError("smoothing.refine auto reached the stage")
    check_finite_weights(root)
    res = BlockResult()
    stats = scales
    hess = None
    if q.gptq and ids is not None:
        from .gptq import Hessians

        hess = Hessians({n: root.get_submodule(n) for n in qnames},
                        shared={n: t.key for t in targets for n in t.linear_names}, sink=q.gptq_sink)
    auto = sm.alpha == "auto"
    with hess if hess is not None else contextlib.nullcontext():
        if targets and collects(recipe, scales is not None):
            if ids is None:
                raise ValueError("this block needs calibration inputs")  # a driver bug, not a user error
            fresh = calibrate(root, ids, sorted({n for t in targets for n in t.linear_names}),
                              sample_names=tuple(t.linear_names[0] for t in targets) if auto else (),
                              sample_tokens=sm.auto_tokens if auto else 0, seed=cal.seed,
                              statistic=cal.statistic, progress=progress)
            res.act_max, res.tokens = fresh.act_max, fresh.tokens
            stats = fresh if scales is None else CalibrationStats(scales.act_max, fresh.samples, fresh.tokens)
        elif hess is not None:
            with torch.inference_mode():
                for w in range(ids.shape[0]):
                    root(ids[w:w + 1], use_cache=False)
            res.tokens = int(ids.numel())
    before = {n: linear_weight(root.get_submodule(n)).detach().clone() for n in qnames} if hess else {}  # own dtype
    if targets:
        if auto and callable(getattr(root, "output", None)):  # one decoder layer: score its whole output
            from .alpha import search_layer_alpha_

            res.alphas, res.errors, res.refined = search_layer_alpha_(
                root, targets, qnames, stats, sm.grid, windows=range(min(sm.score_windows, ids.shape[0])),
                act=simulated_act(recipe), float_inputs=layout[1], refine=sm.refine)
        elif auto:
            from .alpha import group_error, search_alpha_

            if layout[1]:
                raise ValueError("a16 needs the layer-output search")  # a driver bug, not a user error
            res.alphas, res.errors = search_alpha_(root, targets, stats, sm.grid, progress=progress,
                                                   error=group_error(simulated_act(recipe)))
        elif sm.alpha != 0.0:
            res.alphas = smooth_(root, stats.act_max, sm.alpha, targets=targets)
        else:
            res.alphas = {t.key: 0.0 for t in targets}
    if layout[0]:
        from .a16 import layout_

        res.layout = layout_(root, layout[0], layout[1], ids)
    if q.max_kl is not None:
        res.originals = {n: copy.deepcopy(root.get_submodule(n)).cpu() for n in qnames}
    if hess is not None:
        _gptq_convert_(root, qnames, hess, before, q)
    else:
        replace_linears_(root, qnames, q, progress=progress)
    if check_ids is not None:
        check_fp16_range(root, check_ids, every=bool(q.a16))
    return res


def block_report(recipe: Recipe, res: BlockResult) -> Report:
    """The quantization fields of the report from what the stage(s) chose and measured."""
    q, sm, cal = recipe.quantization, recipe.smoothing, recipe.calibration
    rep = Report(q.method, q.effective_threshold, list(q.skip), gptq=q.gptq, gptq_sink=q.gptq and q.gptq_sink)
    if q.method == "smoothquant" or res.alphas:  # weight-only: when it was rescaled
        rep.alpha, rep.alphas = sm.alpha, res.alphas
        if sm.alpha == "auto" and sm.refine and q.method == "smoothquant":  # llmq/alpha.py refines W8A8 only
            rep.refined = {"groups": list(sm.refine), "ratios": res.refined}
    if needs_windows(recipe):
        rep.calibration = CalibrationInfo.of(cal, res.tokens)
    if q.a16:
        rep.a16 = {"modules": list(q.a16), "threshold": q.effective_threshold, "count": res.a16_count,
                   "scales_log2": res.layout}
    return rep


def input_scales(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """The input scales s of a smoothed weight, up to one constant factor, from its values before and after:
    after = diag(1 / t) before diag(s), where t is the row scaling of a linear that is also a group's `prev`
    (v_proj, up_proj). log |after / before| = log s_j - log t_r: less its row's mean it is log s_j less the
    mean of log s, the same in every row, so its mean over rows gives s up to one factor (zero weights are
    left out, which moves the others by ~1e-5). A ratio of column sums would mix t into each column
    differently. Columns with no nonzero pair get 1. In blocks of rows, so the temporaries stay small."""
    total = torch.zeros(before.shape[1], dtype=torch.float64, device=before.device)
    count = torch.zeros_like(total)
    for b, a in zip(before.split(1024), after.split(1024), strict=True):
        both = (b != 0) & (a != 0)
        logs = torch.where(both, (a.float() / torch.where(both, b.float(), 1.0)).abs().log(), 0.0).double()
        rows = logs.sum(1, keepdim=True) / both.sum(1, keepdim=True).clamp(min=1)
        total += torch.where(both, logs - rows, 0.0).sum(0)
        count += both.sum(0)
    return torch.where(count > 0, (total / count.clamp(min=1)).exp(), 1.0).float()


def _gptq_convert_(root: nn.Module, qnames: list[str], hess, before: dict[str, torch.Tensor], q) -> None:
    """Replace each linear with an Int8 module whose rows llmq/gptq.py rounded against its input Hessian.
    H was accumulated before smoothing; smoothing divides input channel j by s_j (`input_scales`), so the
    smoothed input's Hessian is D H D with D = diag(1 / s); a constant factor in s changes nothing (GPTQ's
    damping is relative to H's mean diagonal, its updates use ratios of U, the clip choice compares errors
    per row)."""
    from .gptq import STAGE_CLIP_GRID, quantize_weight
    from .quantize import check_weight_range, int8_linear

    for name in qnames:
        module = root.get_submodule(name)
        w = linear_weight(module).detach().float()
        s = input_scales(before[name].to(w.device), w)
        cb, scb = quantize_weight(w, hess[name], clip_grid=STAGE_CLIP_GRID, in_scale=s)
        check_weight_range(float(scb.max()), name)
        parent, _, child = name.rpartition(".")
        new = int8_linear(cb, scb, module.bias, q.effective_threshold, device=w.device, training=module.training)
        setattr(root.get_submodule(parent) if parent else root, child, new)
        del module, w, s, cb, scb
        trim_heap()  # the factorization's freed matrices, or glibc keeps them and the resident size grows
