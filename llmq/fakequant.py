"""Simulated (fake) int8 quantization in float32: quantize, round, clamp, dequantize.

Used to score smoothing alphas (llmq/alpha.py) and for the SmoothQuant paper's O1-O3 granularities in the
benchmarks. Symmetric, 127 levels each side, like bitsandbytes' vector-wise int8.
"""

from __future__ import annotations

import torch


def fq(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Abs-max int8 fake quantization: per row of `dim` (-1: per token / per output channel) or per tensor (None)."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = amax.clamp(min=1e-8) / 127.0
    return (x / scale).round().clamp(-127, 127) * scale


def fq_static(x: torch.Tensor, amax: float) -> torch.Tensor:
    """Per-tensor static: a calibrated scale, values beyond it clipped (the paper's O3)."""
    scale = max(float(amax), 1e-8) / 127.0
    return (x / scale).round().clamp(-127, 127) * scale
