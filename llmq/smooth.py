"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, exactly.

For one group (a module `prev` whose output feeds the linears `L`) and each channel j between them::

    s_j = max|X_j| ** alpha / max|W_j| ** (1 - alpha)

max|X_j|: the calibration running abs-max of the linears' input channel j, clamped at >= 1e-5;
max|W_j|: the abs-max of column j over the weights of all linears in L, clamped at >= 1e-5;
s is clamped at >= 1e-5 (as in mit-han-lab/smoothquant). Then prev's output channel j is divided by s_j
(a norm's weight and bias; a Gemma norm's (1 + w), i.e. w <- (1 + w) / s - 1; a linear's output row and
bias) and column j of every weight in L is multiplied by s_j: X W^T = (X / s)(W * s)^T, exact in real
arithmetic, so float32 logits do not change (tests/test_smooth.py checks every family in llmq/arch.py).

llmq convention: alpha == 0 means NO smoothing, s = 1 exactly, weights untouched. (The formula at
alpha 0 would put the whole range onto the activations, which nobody wants.) Alpha 0 is the naive
W8A8 baseline everywhere in llmq.

GQA (v_o with kv_heads < heads): s lives in v's output space [kv_heads * head_dim]; o's input has
heads * head_dim channels and query head h reads kv head h // n_rep. Activation and weight maxima of o
are reduced (max) over the n_rep query heads sharing a kv head, and s is expanded back to o's inputs.

Within a layer the groups are applied in table order (attn, v_o, mlp, up_down), which leaves each
group's consumers untouched until its own turn: every s is computed from the original weights.
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
    names = tuple(f"{base}.{n}" for n in g.linears)
    in_dims = {linear_weight(_module(model, n)).shape[1] for n in names}
    if len(in_dims) != 1:
        raise UnsupportedArchitecture(f"{names} have input sizes {sorted(in_dims)}, expected one size; "
                                      "fix llmq/arch.py")
    in_dim = in_dims.pop()
    n_rep, head_dim = 1, 0
    if g.name == "v_o":
        heads = text_cfg.num_attention_heads
        kv = g.kv_heads or getattr(text_cfg, "num_key_value_heads", None) or heads
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
    return [_resolve(model, text_cfg, f"{arch.layers}.{i}", g) for i in range(len(layers)) for g in active]


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
    """s = max|X|^alpha / max|W|^(1-alpha) with the reference clamps; alpha 0 -> ones (no smoothing)."""
    if alpha == 0:
        return torch.ones(weight_max.shape, dtype=torch.float32, device=weight_max.device)
    a = act_max.float().to(weight_max.device).clamp(min=_EPS)
    w = weight_max.float().clamp(min=_EPS)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=_EPS)


def _update_(target: SmoothTarget, p: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """p <- fn(p) computed in float32, cast back to p's dtype (p may be a view)."""
    new = fn(p.detach().float()).to(p.dtype)
    if not torch.isfinite(new).all():
        raise NumericalError(f"smoothing {target.key} made {target.prev_name} or its linears non-finite "
                             f"in {p.dtype}; use a smaller alpha or float32")
    p.copy_(new)  # callers hold torch.no_grad()


def apply_scales_(model: nn.Module, target: SmoothTarget, s: torch.Tensor) -> None:
    """Divide prev's output channels by s and multiply the consumers' input channels by s, in place."""
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
        elif target.prev_kind == "gemma_norm":  # output = norm(x) * (1 + w)
            _update_(target, prev.weight, lambda x: (1.0 + x) / sp - 1.0)
        else:
            _update_(target, prev.weight, lambda x: x / sp)
            if getattr(prev, "bias", None) is not None:
                _update_(target, prev.bias, lambda x: x / sp)
        s_in = expand_to_inputs(target, s.float())
        for name in target.linear_names:
            w = linear_weight(model.get_submodule(name))
            si = s_in.to(w.device)
            _update_(target, w, lambda x, si=si: x * si[None, :])


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
    """Smooth one target in place with `alpha`; returns the scales s applied (None for alpha 0: untouched)."""
    if alpha == 0:
        return None
    s = smoothing_scales(act_max(target, act_scales), weight_max(model, target), alpha)
    apply_scales_(model, target, s)
    return s


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
