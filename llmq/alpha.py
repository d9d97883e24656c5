"""`--alpha auto`: per smoothing group, the alpha of `grid` (which includes 0 = no smoothing) whose smoothed,
int8-simulated output of the consuming linears is closest to the float output on calibration rows.

For a group with input sample X (calibration rows) and consuming weights W (stacked, [out, in]):
    err(a) = || fq_token(X / s_a) @ fq_channel(W * s_a)^T - X @ W^T ||_F^2
fq_token/fq_channel are bitsandbytes' W8A8 layout (per-token activations, per-output-channel weights).
Alpha 0 is always a candidate, so the chosen error is never above no smoothing's. Groups are searched in
table order and each chosen scale is applied before the next group is searched, so weight maxima are
always those of the model as it will be quantized.
"""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from .calibrate import CalibrationStats
from .fakequant import fq
from .smooth import (
    SmoothTarget,
    act_max,
    apply_scales_,
    expand_to_inputs,
    linear_weight,
    smoothing_scales,
    weight_max,
)

log = logging.getLogger(__name__)


def group_error(x: torch.Tensor, w: torch.Tensor, s_in: torch.Tensor, ref: torch.Tensor) -> float:
    """Squared error of the W8A8-simulated product after smoothing with input-space scales s_in."""
    y = fq(x / s_in, dim=-1) @ fq(w * s_in, dim=-1).t()
    return float((y - ref).pow(2).sum())


@torch.no_grad()
def search_alpha_(model, targets: list[SmoothTarget], stats: CalibrationStats, grid: tuple[float, ...],
                  progress: bool = True) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Pick and apply, in place, the best alpha per target. Returns (alpha per key, error per alpha per key)."""
    chosen: dict[str, float] = {}
    errors: dict[str, dict[str, float]] = {}
    for t in tqdm(targets, desc="alpha search", unit="group", disable=not progress):
        x = stats.samples[t.linear_names[0]].float()
        w = torch.cat([linear_weight(model.get_submodule(n)).float().cpu() for n in t.linear_names])
        ref = x @ w.t()
        amax, wmax = act_max(t, stats.act_max), weight_max(model, t).float().cpu()
        errs = {}
        for a in grid:
            s = smoothing_scales(amax, wmax, a)
            errs[a] = group_error(x, w, expand_to_inputs(t, s).float().cpu(), ref)
        best = min(grid, key=lambda a: (errs[a], a))
        chosen[t.key] = best
        errors[t.key] = {f"{a:g}": e for a, e in errs.items()}
        if best != 0.0:
            apply_scales_(model, t, smoothing_scales(amax, wmax, best))
    log.info("auto alpha: %s", {k: v for k, v in list(chosen.items())[:4]})
    return chosen, errors
