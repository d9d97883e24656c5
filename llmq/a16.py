"""Mixed W8A8 / W8A16 in one stock checkpoint (`quantization.a16`, `--a16 down_proj`): the named linears keep
16-bit activations (weight-only int8) while every other linear stays SmoothQuant W8A8.

bitsandbytes' `Linear8bitLt` sends every input column holding an |x| >= its threshold to a 16-bit matmul
against the dequantized int8 weights and quantizes the other columns per token (LLM.int8's split); stock
transformers gives every linear the one `llm_int8_threshold` of config.json. So llmq writes T = A16_THRESHOLD
there and moves each linear's input to its side of T by an exact power-of-two rescaling of its smoothing group
(llmq/arch.py's table; llmq/smooth.py `apply_scales_` with a constant s: the feeding norm or linear scaled one
way, the consumers' weights the other, the float model unchanged and per-token / per-row int8 scale-free):

- a W8A8 group whose calibrated input reaches W8A8_MAX = T / 2 is scaled down under it, so its linears stay
  int8 x int8; where unseen text still reaches T, those columns take the 16-bit path (slower, not worse);
- an a16 group is scaled up until its input max (and its feeding linear's output max) lies in (A16_MAX / 2,
  A16_MAX], 2^11 being 32x under float16's 65504 and 128-256x above T: every column holding an element at T or
  more is exact 16-bit, and elements below stay int8 at a step of at most T / 127, under 1/16,000 of the
  calibrated max. The scale is capped so that the int8 weight step stays far above float16's subnormal spacing
  (bitsandbytes dequantizes the weights to float16) and the feeding weights inside float16.

Measured (docs/benchmarks.md, "Built: `--a16 down_proj`"): down_proj as W8A16 cuts W8A8's KL by 51-60% on SmolLM2
and Gemma 3 at int8 size, for about half of W8A8's CPU decode speed. Only linears that are the whole consumer set
of a group can be a16: their input must be rescalable exactly (down_proj of a gated MLP through up_proj; o_proj
through v_proj; q/k/v or gate/up through their norm). Everything else is a ConfigError.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .config import A16_THRESHOLD, GROUPS
from .errors import ConfigError
from .smooth import SmoothTarget, apply_scales_, linear_weight

log = logging.getLogger(__name__)

W8A8_MAX = A16_THRESHOLD / 2  # a W8A8 group's calibrated input max is brought under this
A16_MAX = 2.0**11  # an a16 group's calibrated input (and feeding output) max is brought up to at most this
MIN_WEIGHT_STEP = 2.0**-18  # smallest int8 weight step (row max / 127) an a16 scale may leave in the low decile
# of rows: 64 float16 subnormal steps, so dequantizing to float16 adds under 1% of a step
PREV_WEIGHT_MAX = 65504.0 / 4  # largest |weight| a rescaling may leave (an a16 group's feeding linear, a W8A8
# group's consumers)


def a16_linears(names: list[str], a16: tuple[str, ...]) -> set[str]:
    """The linears of `names` that `a16` selects, by the rule --skip uses (llmq/quantize.py `skipped`)."""
    from .quantize import skipped

    return {n for n in names if skipped(n, a16)} if a16 else set()


def layout_targets(model: nn.Module, qnames: list[str], a16: tuple[str, ...]) -> tuple[list[SmoothTarget], set[str]]:
    """(every smoothing group of the model, per llmq/arch.py, the a16 linears among `qnames`). ConfigError
    when an a16 entry selects no converted linear, selects only part of a group's consumers, or a linear that
    no group feeds (its input cannot be rescaled exactly)."""
    from .smooth import smooth_targets

    if not a16:
        return [], set()
    chosen = a16_linears(qnames, a16)
    for k in a16:
        if not a16_linears(qnames, (k,)):
            raise ConfigError(f"--a16 {k!r} matches no linear that becomes int8; give a module name or suffix "
                              "such as down_proj")
    targets = smooth_targets(model, GROUPS)
    fed = set()
    for t in targets:
        inside = [n for n in t.linear_names if n in chosen]
        if inside and len(inside) != len([n for n in t.linear_names if n in qnames]):
            raise ConfigError(f"--a16 selects {inside[0]} but not the other linears fed by {t.prev_name} "
                              f"({', '.join(n.rsplit('.', 1)[-1] for n in t.linear_names)}): one rescaling "
                              "moves all of them, so name all of them or none")
        fed.update(inside)
    lone = sorted(chosen - fed)
    if lone:
        raise ConfigError(f"--a16 selects {lone[0]}, whose input no norm or linear of llmq/arch.py's table feeds "
                          "alone (e.g. an MLP's down projection after GELU), so it cannot be rescaled exactly; "
                          "choose down_proj of a gated MLP, or o_proj")
    return targets, chosen


def _pow2_floor(x: float) -> float:
    return 2.0 ** math.floor(math.log2(x))


@torch.no_grad()
def measure(root: nn.Module, targets: list[SmoothTarget], a16: set[str], ids: torch.Tensor) -> dict[str, float]:
    """Largest |value| over the windows `ids` of each target's consumer inputs (key: the target's key) and of
    the outputs of a16 targets' feeding linears (key: prev name), on the block as it is (float, smoothed)."""
    top: dict[str, float] = {}

    def hook(key: str, pos: int):
        def fn(module, args, out=None):
            t = args[0] if pos == 0 else out
            t = t[0] if isinstance(t, (tuple, list)) else t
            top[key] = max(top.get(key, 0.0), float(t.detach().abs().amax()))
        return fn

    handles = []
    for t in targets:
        for n in t.linear_names:
            handles.append(root.get_submodule(n).register_forward_pre_hook(hook(t.key, 0)))
        if t.prev_kind == "linear" and set(t.linear_names) <= a16:
            handles.append(root.get_submodule(t.prev_name).register_forward_hook(hook(t.prev_name, 1)))
    try:
        with torch.inference_mode():
            for w in range(ids.shape[0]):
                root(ids[w:w + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return top


def scale_for(root: nn.Module, t: SmoothTarget, a16: set[str], top: dict[str, float]) -> float:
    """The power of two c that multiplies target `t`'s consumer inputs (1: leave it)."""
    m = top.get(t.key, 0.0)
    if not set(t.linear_names) <= a16:  # W8A8 consumers: under W8A8_MAX, never scaled up
        if not (W8A8_MAX < m < math.inf):
            return 1.0
        c = 2.0 ** -math.ceil(math.log2(m / W8A8_MAX))
        w = max(float(linear_weight(root.get_submodule(n)).detach().abs().max()) for n in t.linear_names)
        # their weights are multiplied by 1 / c: kept within float16 / 4 (else those columns go 16-bit at T)
        return c if w == 0 else max(c, min(1.0, 1 / _pow2_floor(PREV_WEIGHT_MAX / w)))
    m = max(m, top.get(t.prev_name, 0.0))
    if not 0 < m < math.inf:
        return 1.0
    c = _pow2_floor(A16_MAX / m)
    rows = torch.cat([linear_weight(root.get_submodule(n)).detach().abs().amax(1).float().cpu()
                      for n in t.linear_names])
    rows = rows[rows > 0]
    if rows.numel():  # consumers' weights are divided by c: the low decile of their rows keeps its int8 step
        c = min(c, _pow2_floor(float(rows.quantile(0.1)) / 127 / MIN_WEIGHT_STEP))
    if t.prev_kind == "linear" and c > 1:
        w = linear_weight(root.get_submodule(t.prev_name))
        lo, hi = t.prev_rows or (0, w.shape[0])
        c = min(c, max(1.0, _pow2_floor(PREV_WEIGHT_MAX / float(w[lo:hi].detach().abs().max()))))
    return c


@torch.no_grad()
def layout_(root: nn.Module, targets: list[SmoothTarget], a16: set[str], ids: torch.Tensor) -> dict[str, int]:
    """Rescale the block's groups (in table order) so that its W8A8 inputs stay under the threshold and its
    a16 inputs reach far above it; returns log2 of each applied scale by target key (0s left out)."""
    top = measure(root, targets, a16, ids)
    done: dict[str, int] = {}
    for t in targets:
        c = scale_for(root, t, a16, top)
        if set(t.linear_names) <= a16 and top.get(t.key, 0.0) * c < A16_THRESHOLD:
            log.warning("a16: %s's input reaches only %.3g after the largest safe rescaling (x%g), under the "
                        "threshold %g: its linears stay W8A8 (int8 x int8)", t.key, top.get(t.key, 0.0) * c, c,
                        A16_THRESHOLD)
        if c != 1.0:
            apply_scales_(root, t, torch.full((t.channels,), 1.0 / c))  # prev / s, consumers * s: inputs * c
            done[t.key] = int(math.log2(c))
    log.debug("a16 layout: %s", done)
    return done


_ALL_INT8 = ": no fp16 outlier path, every matmul is int8 x int8."  # in llmq/card.py's smoothquant text
_CARD = (" Except the linears matching {names} ({count} of them): they keep 16-bit activations (weight-only int8, "
         "W8A16) in the same checkpoint. Stock transformers gives every linear one threshold, so llmq set it to {t:g} "
         "and rescaled each linear's input by an exact power of two through the norm or linear that feeds it (the "
         "float model's output unchanged): the W8A8 linears' inputs stay below the threshold (int8 x int8), the "
         "W8A16 linears' inputs lie far above it (16-bit; their small elements below it stay int8, at a step under "
         "threshold / 127). A W8A8 input column that unseen text pushes above the threshold takes the 16-bit path "
         "too: slower, not less accurate.")


def card_text(method_text: str, a16: dict) -> str:
    """The model card's smoothquant method text with the report's `a16` exception."""
    names = ", ".join(f"`{m}`" for m in a16.get("modules", []))
    return method_text.replace(_ALL_INT8, ".") + _CARD.format(names=names, count=a16.get("count"),
                                                               t=float(a16.get("threshold", "nan")))
