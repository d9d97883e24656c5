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

`search_alpha_sim_` is llmq/alpha.py's per-group search with the error measured under the simulated
granularity instead of bitsandbytes' (per-token, per-channel) one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .calibrate import CalibrationStats
from .config import GROUPS
from .errors import ConfigError
from .fakequant import fq, fq_static
from .smooth import (
    SmoothTarget,
    act_max,
    apply_scales_,
    expand_to_inputs,
    linear_weight,
    smooth_targets,
    smoothing_scales,
    weight_max,
)

log = logging.getLogger(__name__)

ACTIVATIONS = {"token": "O1", "tensor": "O2", "static": "O3"}
WEIGHTS = ("channel", "tensor")


@dataclass(frozen=True)
class SimMode:
    """One simulated W8A8 granularity: activations token|tensor|static, weights channel|tensor."""

    act: str = "token"
    weight: str = "channel"

    def __post_init__(self) -> None:
        if self.act not in ACTIVATIONS or self.weight not in WEIGHTS:
            raise ConfigError(f"simulated mode act={self.act!r} weight={self.weight!r}; allowed act "
                              f"{list(ACTIVATIONS)} and weight {list(WEIGHTS)}")

    @property
    def name(self) -> str:
        """E.g. ``O1-channel`` (paper level, weight granularity)."""
        return f"{ACTIVATIONS[self.act]}-{self.weight}"


def fq_act(x: torch.Tensor, act: str, amax: float | None = None) -> torch.Tensor:
    """Fake-quantize an activation tensor: per token (last dim), per tensor, or static with `amax`."""
    if act == "static":
        if amax is None:
            raise ConfigError("static (O3) activation quantization needs a calibrated abs-max; got None")
        return fq_static(x, amax)
    return fq(x, -1 if act == "token" else None)


def fq_weight(w: torch.Tensor, weight: str) -> torch.Tensor:
    """Fake-quantize a [out, in] weight per output channel or per tensor."""
    return fq(w, -1 if weight == "channel" else None)


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not 0.0 <= a <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha!r}")
    return a


@torch.no_grad()
def smooth_scaled_(model: nn.Module, targets: Sequence[SmoothTarget], act_scales: Mapping[str, torch.Tensor],
                   alpha: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """`smooth.smooth_` over `targets`, returning each consuming linear's input-space scales s (for O3)."""
    s_in: dict[str, torch.Tensor] = {}
    for t in targets:
        a = _check_alpha(alpha[t.key] if isinstance(alpha, Mapping) else alpha)
        if a == 0:
            continue
        s = smoothing_scales(act_max(t, act_scales), weight_max(model, t), a)
        apply_scales_(model, t, s)
        for n in t.linear_names:
            s_in[n] = expand_to_inputs(t, s).float().cpu()
    return s_in


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


@torch.no_grad()
def simulate_(model: nn.Module, mode: SimMode, names: Sequence[str],
              amax: Mapping[str, float] | None = None) -> list[Any]:
    """Fake-quantize the weights of the linears `names` in place and hook their inputs; returns the hook
    handles (call `.remove()` on each to stop quantizing activations; the weights stay fake-quantized)."""
    if mode.act == "static" and (amax is None or not set(names) <= set(amax)):
        raise ConfigError("static (O3) simulation needs `amax` for every simulated linear; use static_amax()")
    handles = []
    for n in names:
        m = model.get_submodule(n)
        w = linear_weight(m)
        w.copy_(fq_weight(w.float(), mode.weight).to(w.dtype))
        a = amax[n] if amax is not None and mode.act == "static" else None

        def hook(module, args, a=a):
            return (fq_act(args[0], mode.act, a).to(args[0].dtype), *args[1:])

        handles.append(m.register_forward_pre_hook(hook))
    return handles


def group_error(x: torch.Tensor, ws: Sequence[torch.Tensor], s_in: torch.Tensor, ref: torch.Tensor,
                mode: SimMode, amax: float | None = None) -> float:
    """Squared error of one group's product under `mode` after smoothing with s_in (cf. alpha.group_error);
    `amax`: the calibrated per-tensor abs-max of the smoothed input (O3 only)."""
    xq = fq_act(x / s_in, mode.act, amax)
    y = xq @ torch.cat([fq_weight(w * s_in, mode.weight) for w in ws]).t()
    return float((y - ref).pow(2).sum())


@torch.no_grad()
def search_alpha_sim_(model: nn.Module, targets: Sequence[SmoothTarget], stats: CalibrationStats,
                      grid: Sequence[float], mode: SimMode) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per group, pick and apply (in place) the alpha of `grid` with the least simulated error on the
    calibration rows. Returns (alpha per target key, input-space scales per smoothed linear)."""
    chosen: dict[str, float] = {}
    s_in: dict[str, torch.Tensor] = {}
    for t in targets:
        first = t.linear_names[0]
        if first not in stats.samples:
            raise ConfigError(f"no calibration rows for {first}; calibrate with sample_names and sample_tokens")
        x = stats.samples[first].float()
        ws = [linear_weight(model.get_submodule(n)).float().cpu() for n in t.linear_names]
        ref = x @ torch.cat(ws).t()
        amax_ch, wmax = act_max(t, stats.act_max), weight_max(model, t).float().cpu()
        x_ch = stats.act_max[first].float().cpu()
        errs = {}
        for a in grid:
            si = expand_to_inputs(t, smoothing_scales(amax_ch, wmax, a)).float().cpu()
            errs[a] = group_error(x, ws, si, ref, mode, float((x_ch / si).max()))
        best = min(grid, key=lambda a: (errs[a], a))
        chosen[t.key] = best
        if best != 0.0:
            s = smoothing_scales(amax_ch, wmax, best)
            apply_scales_(model, t, s)
            for n in t.linear_names:
                s_in[n] = expand_to_inputs(t, s).float().cpu()
    return chosen, s_in


def simulated_perplexity(model: nn.Module, base_state: Mapping[str, torch.Tensor], ids: torch.Tensor,
                         seq_len: int, stats: CalibrationStats, mode: SimMode, alpha: float | str, *,
                         names: Sequence[str], groups: Sequence[str] = GROUPS,
                         grid: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                         ) -> dict[str, Any]:
    """Restore `base_state`, smooth (fixed alpha on every group, or "auto"), simulate `mode` on `names`,
    and score `ids` with llmq.evaluate's protocol. The model is left smoothed and fake-quantized."""
    from .evaluate import evaluate_ids

    model.load_state_dict(base_state)
    targets = smooth_targets(model, groups)
    if alpha == "auto":
        alphas, s_in = search_alpha_sim_(model, targets, stats, grid, mode)
    else:
        s_in = smooth_scaled_(model, targets, stats.act_max, float(alpha))
        alphas = dict.fromkeys((t.key for t in targets), float(alpha))
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
