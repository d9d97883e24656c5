"""Simulated W8A8 (fake quantization in float32) with the SmoothQuant paper's granularities (Xiao et al.
2023, Table 2), applied to the linears of a float model with forward pre-hooks.

Activations (`SimMode.act`):
- ``token``  (O1): per-token dynamic, one abs-max scale per row at run time (bitsandbytes' W8A8 layout);
- ``tensor`` (O2): per-tensor dynamic, one abs-max scale per input tensor at run time (per window here,
  since evaluation runs one window at a time);
- ``static`` (O3): per-tensor static, one scale per linear from the calibration abs-max; values beyond it
  are clipped. After smoothing with input-space scales s, a linear's static abs-max is max_j(max|X_j| / s_j),
  which is exact (smoothing divides channel j by s_j), so no recalibration is needed per alpha.
Weights (`SimMode.weight`): ``channel`` (one scale per output row, bitsandbytes' layout) or ``tensor`` (one
scale per matrix, the paper's O1-O3 choice).

`sim_error(mode)` is the error function llmq/alpha.py's per-group search takes, measured under the simulated
granularity instead of bitsandbytes' (per-token, per-channel) one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .calibrate import CalibrationStats
from .config import GROUPS, check_alpha
from .errors import ConfigError
from .fakequant import ACTIVATIONS, WEIGHTS, SimMode, fq_act, fq_weight, simulate_  # noqa: F401
from .smooth import expand_to_inputs, smooth_target_, smooth_targets

log = logging.getLogger(__name__)

def static_amax(act_scales: Mapping[str, torch.Tensor], s_in: Mapping[str, torch.Tensor],
                names: Sequence[str]) -> dict[str, float]:
    """Per-tensor calibrated abs-max of each linear's input after smoothing: max_j(max|X_j| / s_j)."""
    missing = sorted(set(names) - set(act_scales))
    if missing:
        raise ConfigError(f"act_scales lacks {missing[:3]}; calibrate every simulated linear")
    out = {}
    for n in names:
        x = act_scales[n].float().cpu()
        out[n] = float((x / s_in[n]).max() if n in s_in else x.max())
    return out


def sim_error(mode: SimMode):
    """llmq.alpha's error function under `mode`: err(x, w, s_in, ref, x_max); under O3 the static abs-max of
    the smoothed input is max_j(x_max_j / s_j), exact for any candidate s."""
    def err(x: torch.Tensor, w: torch.Tensor, s_in: torch.Tensor, ref: torch.Tensor, x_max: torch.Tensor) -> float:
        y = fq_act(x / s_in, mode.act, float((x_max / s_in).max())) @ fq_weight(w * s_in, mode.weight).t()
        return float((y - ref).pow(2).sum())
    return err


def simulated_perplexity(model: nn.Module, base_state: Mapping[str, torch.Tensor], ids: torch.Tensor,
                         seq_len: int, stats: CalibrationStats, mode: SimMode, alpha: float | str, *,
                         names: Sequence[str], groups: Sequence[str] = GROUPS,
                         grid: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                         ) -> dict[str, Any]:
    """Restore `base_state`, smooth (fixed alpha on every group, or "auto"), simulate `mode` on `names`,
    and score `ids` with llmq.evaluate's protocol. The model is left smoothed and fake-quantized."""
    from .alpha import search_alpha_
    from .evaluate import evaluate_ids

    model.load_state_dict(base_state)
    targets = smooth_targets(model, groups)
    s_in: dict[str, torch.Tensor] = {}
    if alpha == "auto":
        # the search applies each chosen s; record it through the same formula before it is applied
        alphas, _ = search_alpha_(model, targets, stats, grid, error=sim_error(mode), progress=False)
        model.load_state_dict(base_state)
    else:
        alphas = dict.fromkeys((t.key for t in targets), check_alpha(alpha))
    with torch.no_grad():
        for t in targets:
            s = smooth_target_(model, t, stats.act_max, alphas[t.key])
            if s is not None:
                s_in.update({n: expand_to_inputs(t, s).float().cpu() for n in t.linear_names})
    amax = static_amax(stats.act_max, s_in, names) if mode.act == "static" else None
    handles = simulate_(model, mode, names, amax)
    try:
        r = evaluate_ids(model, ids, seq_len, progress=False)
    finally:
        for h in handles:
            h.remove()
    vals = list(alphas.values())
    log.info("simulated %s alpha=%s: perplexity %.4f", mode.name, alpha, r.perplexity)
    return {"mode": mode.name, "alpha": alpha, "perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens,
            "alphas": alphas, "mean_alpha": sum(vals) / len(vals) if vals else 0.0}
