"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, exactly.

For one group (a module `prev` whose output feeds the linears `L`) and each channel j between them::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

max|X_j|: the calibration running abs-max of the linears' input channel j; max|W_j|: the abs-max of column j
over the weights of all linears in L; both clamped at >= 1e-5, and s clamped at >= 1e-5 (as in
mit-han-lab/smoothquant). A dead channel (max|X_j| or max|W_j| at most 1e-5 of the group's largest, e.g. 0)
keeps s_j = 1: it carries nothing to balance, and the formula would scale its weights or norm by up to 1e5.
Then prev's output channel j is divided by s_j and column j of every weight in L is multiplied by s_j:
X W^T = (X / s)(W * s)^T, exact in real arithmetic, so float32 logits do not change
(tests/test_smooth.py checks every family in llmq/arch.py, in float32, bfloat16 and float16).

Storage (16-bit exactness): a norm applies one multiplier m_j per channel (w_j; a Gemma norm 1 + w_j).
m_j / s_j is first stored in the norm's dtype (a Gemma norm stores w' = m_j / s_j - 1, which cancels badly
in 16 bits when m_j / s_j is small), then the consumers are multiplied by s'_j = m_j / m'_j, computed in
float64 from the multiplier m'_j the model will actually apply. Norm times consumer is then exactly m_j
per channel whatever the rounding, and only the consumer weights' own rounding remains (as for any 16-bit
weight). s' differs from s by the storage rounding (for a Gemma norm in bfloat16, m' is a multiple of
2^-8 below 1). |m_j / s_j| is kept at or above the dtype's smallest step there, so no channel rounds to 0.
A linear `prev` divides whole rows (and bias), elementwise rounding with no cancellation: s' = s.
A norm's bias is divided by s'.

llmq convention: alpha == 0 means NO smoothing, s = 1 exactly, weights untouched. (The formula at
alpha 0 would put the whole range onto the activations, which nobody wants.) Alpha 0 is the naive
W8A8 baseline everywhere in llmq.

GQA (v_o with kv_heads < heads): s lives in v's output space [kv_heads * head_dim]; o's input has
heads * head_dim channels and query head h reads kv head h // n_rep. Activation and weight maxima of o
are reduced (max) over the n_rep query heads sharing a kv head, and s is expanded back to o's inputs.

Within a layer the groups are applied in table order (attn, v_o, mlp, up_down), which leaves each
group's consumers untouched until its own turn: every s is computed from the original weights.

float16 range: bitsandbytes quantizes weights and (W8A8) activations through float16, and on CUDA its int8
matmul writes a float16 output. `fits_fp16` tells whether a candidate's smoothed maxima stay inside.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .arch import Group, get_arch
from .config import GROUPS, check_alpha
from .errors import ConfigError, NumericalError, UnsupportedArchitecture

logger = logging.getLogger(__name__)

_EPS = 1e-5


@dataclass(frozen=True)
class SmoothTarget:
    """One smoothing group in one decoder layer, resolved to full module names."""

    key: str  # unique, e.g. "model.layers.3.attn"
    group: str  # "attn" | "mlp" | "v_o" | "up_down"
    prev_name: str  # module whose output channels are divided by s (norm or linear)
    linear_names: tuple[str, ...]  # consumers whose input channels are multiplied by s
    prev_kind: str = "norm"  # "norm" | "gemma_norm" | "linear"
    channels: int = 0  # length of s (prev output space)
    prev_rows: tuple[int, int] | None = None  # fused prev linear: only rows [lo, hi) are divided by s
    n_rep: int = 1  # consumer input channels per s channel (GQA v_o: query heads per kv head)
    head_dim: int = 0  # with n_rep > 1: s is [kv_heads * head_dim]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in]; a transposed view for transformers' Conv1D (stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise UnsupportedArchitecture(
            f"{model.config.model_type} model has no module {name!r} named in llmq/arch.py (this "
            "transformers version lays the family out differently); use --method llm-int8 or weight-only"
        ) from None


def _resolve(model: nn.Module, text_cfg, base: str, g: Group) -> SmoothTarget:
    prev = _module(model, f"{base}.{g.prev}")
    if getattr(prev, "weight", None) is None:
        raise UnsupportedArchitecture(f"{base}.{g.prev} has no weight to divide by s; fix llmq/arch.py")
    names = tuple(f"{base}.{n}" for n in g.linears
                  if not g.partial or n == g.linears[0] or _has(model.get_submodule(base), n))
    in_dims = {linear_weight(_module(model, n)).shape[1] for n in names}
    if len(in_dims) != 1:
        raise UnsupportedArchitecture(f"{names} have input sizes {sorted(in_dims)}, expected one size; "
                                      "fix llmq/arch.py")
    in_dim = in_dims.pop()
    n_rep, head_dim = 1, 0
    if g.name == "v_o":
        heads = text_cfg.num_attention_heads
        kv = getattr(text_cfg, "num_key_value_heads", None) or heads
        n_rep, head_dim = heads // kv, in_dim // heads
    size = in_dim // n_rep
    prev_rows = None
    have = linear_weight(prev).shape[0] if g.prev_kind == "linear" else prev.weight.numel()
    if g.tail and have >= size:
        prev_rows = (have - size, have)
    elif have != size:
        raise UnsupportedArchitecture(
            f"{base}.{g.prev} has {have} output channels but {names} need {size}; fix llmq/arch.py")
    return SmoothTarget(f"{base}.{g.name}", g.name, f"{base}.{g.prev}", names, g.prev_kind, size,
                        prev_rows, n_rep, head_dim)


def smooth_targets(model: nn.Module, groups: Sequence[str] = GROUPS) -> list[SmoothTarget]:
    """Every smoothing group of every decoder layer, per llmq/arch.py; raises UnsupportedArchitecture."""
    bad = sorted(set(groups) - set(GROUPS))
    if bad:
        raise ConfigError(f"unknown smoothing groups {bad}; allowed: {list(GROUPS)}")
    arch = get_arch(model.config.model_type)
    text_cfg = model.config.get_text_config()
    layers = _module(model, arch.layers)
    active = [g for g in arch.active_groups(text_cfg) if g.name in groups]
    return [_resolve(model, text_cfg, f"{arch.layers}.{i}", g) for i in range(len(layers)) for g in active
            if not g.optional or _has(layers[i], g.linears[0])]


def _has(layer: nn.Module, name: str) -> bool:
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True


def _reduce(target: SmoothTarget, x: torch.Tensor) -> torch.Tensor:
    """Consumer input space -> s space: max over the n_rep query heads that share a kv head."""
    if target.n_rep == 1:
        return x
    return x.reshape(-1, target.n_rep, target.head_dim).amax(1).reshape(-1)


def expand_to_inputs(target: SmoothTarget, s: torch.Tensor) -> torch.Tensor:
    """s in the consumers' input space (identity except GQA v_o)."""
    if target.n_rep == 1:
        return s
    hd = target.head_dim
    return s.view(-1, 1, hd).expand(-1, target.n_rep, hd).reshape(-1)


def act_max(target: SmoothTarget, act_scales: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-channel |X| max in s space, from act_scales[consumer name] = [in_features] running abs-max."""
    xs = [act_scales[n].detach().float().cpu() for n in target.linear_names if n in act_scales]
    if not xs:
        raise ConfigError(f"act_scales has no entry for {target.linear_names[0]!r}; calibrate this model "
                          "again or pass the act_scales file made for it")
    want = target.channels * target.n_rep
    if any(x.shape != (want,) for x in xs):
        raise ConfigError(f"act_scales for {target.linear_names} have shapes {[tuple(x.shape) for x in xs]}, "
                          f"expected ({want},); the act_scales file was made for another model: "
                          "recalibrate without --act-scales")
    return _reduce(target, torch.stack(xs).amax(0))


def weight_max(model: nn.Module, target: SmoothTarget) -> torch.Tensor:
    """Max |W| per input channel over the consuming linears, in s space (float32)."""
    ws = [linear_weight(model.get_submodule(n)).detach().abs().amax(0).float() for n in target.linear_names]
    return _reduce(target, torch.stack([w.to(ws[0].device) for w in ws]).amax(0))


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) with the reference clamps; 1 on dead channels; alpha 0 -> ones."""
    if alpha == 0:
        return torch.ones(weight_max.shape, dtype=torch.float32, device=weight_max.device)
    a = act_max.float().to(weight_max.device)
    w = weight_max.float()
    s = (a.clamp(min=_EPS).pow(alpha) / w.clamp(min=_EPS).pow(1 - alpha)).clamp(min=_EPS)
    dead = (a <= _EPS * a.max()) | (w <= _EPS * w.max())
    dead &= torch.isfinite(a) & torch.isfinite(w)  # inf/nan maxima must reach apply_scales_' check
    return torch.where(dead, torch.ones_like(s), s)


def fits_fp16(weight_max: float | torch.Tensor, act_max: float | torch.Tensor,
              out_max: float | torch.Tensor, headroom: float = 1.0) -> bool:
    """Whether a smoothing candidate keeps bitsandbytes inside float16, where CUDA computes it.

    weight_max: max |W * s| over the group's linears (what Int8Params quantizes from float16);
    act_max: max |X / s| on calibration rows (W8A8 casts activations to float16 before quantizing);
    out_max: an estimate of max |X W^T| (+ bias) of the linears' outputs: CUDA's int8 matmul dequantizes
    into float16, so an output beyond 65504 is inf on GPU although CPU (float32) computes it.
    Tensors count by their largest |value|. False when any value, times `headroom` (> 1 for a margin over
    what calibration saw), exceeds 65504 or is not finite.
    """
    from .quantize import FP16_MAX

    vals = [float(torch.as_tensor(v).detach().abs().max()) for v in (weight_max, act_max, out_max)]
    return all(v * headroom <= FP16_MAX for v in vals)  # nan compares False


def _update_(target: SmoothTarget, p: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """p <- fn(p) computed in float32, cast back to p's dtype (p may be a view)."""
    new = fn(p.detach().float()).to(p.dtype)
    if not torch.isfinite(new).all():
        raise NumericalError(f"smoothing {target.key} made {target.prev_name} or its linears non-finite "
                             f"in {p.dtype}; use a smaller alpha or float32")
    p.copy_(new)  # callers hold torch.no_grad()


def _divide_norm_(target: SmoothTarget, prev: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """Store the norm's multipliers m / s in its dtype; return s' = m / m' (m' as the model computes it)."""
    one = 1.0 if target.prev_kind == "gemma_norm" else 0.0  # Gemma: m = 1 + w, added in float32
    dtype = prev.weight.dtype
    as_model = (lambda w: w.float() + one) if one else (lambda w: w)
    m = as_model(prev.weight.detach().cpu()).double()
    want = m / s.detach().cpu().double()
    floor = torch.finfo(dtype).eps if one else torch.finfo(dtype).tiny  # smallest |m'| that is not 0
    want = torch.where(m == 0, want, want.sign() * want.abs().clamp(min=floor))
    stored = (want - one).to(dtype)
    got = as_model(stored).double()
    s_used = torch.where(m == 0, 1.0, m / got).float()
    _update_(target, prev.weight, lambda _: stored.float().to(prev.weight.device))
    if getattr(prev, "bias", None) is not None:
        _update_(target, prev.bias, lambda b: b / s_used.to(b.device))
    return s_used.to(s.device)


def apply_scales_(model: nn.Module, target: SmoothTarget, s: torch.Tensor) -> torch.Tensor:
    """Divide prev's output channels by s and multiply the consumers' input channels by the same, in place.

    Returns the scales applied (float32, s space): s itself, or for a norm s' = m / m', which makes the
    stored pair exact (see the module docstring)."""
    if s.shape != (target.channels,) or not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise NumericalError(f"smoothing scales for {target.key} must be {target.channels} finite positive "
                             f"values, got shape {tuple(s.shape)} with min {s.min().item():.3g}, "
                             f"max {s.max().item():.3g}; check the act_scales for non-finite values")
    prev = model.get_submodule(target.prev_name)
    with torch.no_grad():
        sp = s.float().to(prev.weight.device)
        if target.prev_kind == "linear":
            w = linear_weight(prev)
            lo, hi = target.prev_rows or (0, w.shape[0])
            _update_(target, w[lo:hi], lambda x: x / sp[:, None])
            if prev.bias is not None:
                _update_(target, prev.bias[lo:hi], lambda x: x / sp)
            s = s.float()
        else:
            s = _divide_norm_(target, prev, s)
        s_in = expand_to_inputs(target, s.float())
        for name in target.linear_names:
            w = linear_weight(model.get_submodule(name))
            si = s_in.to(w.device)
            _update_(target, w, lambda x, si=si: x * si[None, :])
    return s


def _alphas(targets: list[SmoothTarget], alpha: float | Mapping[str, float]) -> dict[str, float]:
    keys = [t.key for t in targets]
    if isinstance(alpha, Mapping):
        missing, extra = sorted(set(keys) - set(alpha)), sorted(set(alpha) - set(keys))
        if missing or extra:
            raise ConfigError(f"per-target alpha must have exactly the target keys; missing {missing[:3]}, "
                              f"unknown {extra[:3]}; pass one alpha per key from smooth_targets()")
        return {k: check_alpha(alpha[k]) for k in keys}
    a = check_alpha(alpha)
    return dict.fromkeys(keys, a)


def smooth_target_(model: nn.Module, target: SmoothTarget, act_scales: Mapping[str, torch.Tensor],
                   alpha: float) -> torch.Tensor | None:
    """Smooth one target in place with `alpha`; returns the scales applied (None for alpha 0: untouched)."""
    if alpha == 0:
        return None
    return apply_scales_(model, target, smoothing_scales(act_max(target, act_scales), weight_max(model, target),
                                                         alpha))


def smooth_(model: nn.Module, act_scales: Mapping[str, torch.Tensor], alpha: float | Mapping[str, float],
            groups: Sequence[str] = GROUPS, *, targets: list[SmoothTarget] | None = None) -> dict[str, float]:
    """Smooth every target in place (alpha per target key when a mapping); returns the alpha used per key.
    `targets`: already resolved ones (e.g. one decoder layer's), instead of every group of `groups`."""
    targets = smooth_targets(model, groups) if targets is None else targets
    alphas = _alphas(targets, alpha)
    with torch.no_grad():
        for t in targets:
            smooth_target_(model, t, act_scales, alphas[t.key])
    done = sum(a != 0 for a in alphas.values())
    logger.debug("smoothed %d of %d groups of %s", done, len(targets), model.__class__.__name__)
    return alphas
