"""Simulated (fake) int8 quantization in float32: quantize, round, clamp, dequantize; and `simulate_`,
which applies it to a model's linears with forward pre-hooks.

Used to score smoothing alphas (llmq/alpha.py) and for the SmoothQuant paper's granularities in the
benchmarks (llmq/simulate.py). Symmetric, 127 levels each side, like bitsandbytes' vector-wise int8.
Activations (`SimMode.act`): ``token`` (O1, per-token dynamic: bitsandbytes' W8A8), ``tensor`` (O2,
per-tensor dynamic), ``static`` (O3, one calibrated scale per linear, values beyond it clipped), ``none``
(inputs left float: weight-only W8A16).
Weights (`SimMode.weight`): ``channel`` (per output row: bitsandbytes') or ``tensor``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .smooth import linear_weight


def fq(x: torch.Tensor, dim: int | None, amax: float | None = None) -> torch.Tensor:
    """Abs-max int8 fake quantization: per row of `dim` (-1: per token / per output channel) or per tensor
    (None); with `amax`, one static calibrated scale and values beyond it clipped (the paper's O3)."""
    if amax is not None:
        m = torch.tensor(float(amax))
    else:
        m = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = m.clamp(min=1e-8) / 127.0
    return (x / scale).round().clamp(-127, 127) * scale


ACTIVATIONS = {"token": "O1", "tensor": "O2", "static": "O3", "none": "W16"}
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
    """Fake-quantize an activation tensor: per token (last dim), per tensor, or static with `amax`; `none`
    returns it untouched."""
    if act == "none":
        return x
    if act == "static":
        if amax is None:
            raise ConfigError("static (O3) activation quantization needs a calibrated abs-max; got None")
        return fq(x, None, amax)
    return fq(x, -1 if act == "token" else None)


def fq_weight(w: torch.Tensor, weight: str) -> torch.Tensor:
    """Fake-quantize a [out, in] weight per output channel or per tensor."""
    return fq(w, -1 if weight == "channel" else None)


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


