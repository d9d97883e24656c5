"""Replace linears with bitsandbytes Int8 modules (the only bitsandbytes importer).

All three methods store the same thing: per-output-channel int8 weights plus one float32 scale per row
(`weight` int8 + `SCB`), in `bnb.nn.Linear8bitLt` with `has_fp16_weights=False`. They differ only in the
outlier threshold, which stock transformers reads back from `config.json`'s `quantization_config`:

- smoothquant (W8A8): threshold 0. Every activation row (token) is quantized to int8 at run time with its
  own abs-max scale; int8 x int8 matmul. The smoothing (llmq/smooth.py) is baked into the weights.
- llm-int8: threshold t (default 6.0). Activation columns holding any |x| >= t take a 16/32-bit matmul
  with the dequantized weight columns (LLM.int8 outlier decomposition); the rest are int8.
- weight-only (W8A16): threshold 1e-6. Every non-zero activation column counts as an "outlier", so the
  whole product is the input in its own dtype times the dequantized int8 weights: weights are int8 in
  memory and on disk, activations never are. Stock transformers + bitsandbytes load it as the same
  Linear8bitLt with that threshold, so the reloaded model computes exactly what llmq computed.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import Counter

import torch
from tqdm.auto import tqdm

from .config import Quantization
from .errors import ConfigError, NumericalError, UnsupportedArchitecture

log = logging.getLogger(__name__)
FP16_MAX = 65504.0
MIN_CONVERTED = 0.9  # share of the linear-like weights (outside skip) that must be convertible


def _silence_bnb() -> None:
    # bitsandbytes warns on every forward that inputs are cast to fp16; that is the documented W8A8 path.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def _is_linear(module) -> bool:
    """Exactly nn.Linear or Conv1D: the only types stock transformers' bitsandbytes loader rebuilds as int8."""
    from transformers.pytorch_utils import Conv1D

    return type(module) in (torch.nn.Linear, Conv1D)


def _linear_like(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    # bitsandbytes' Int8 modules subclass nn.Linear: already converted, not left out
    return isinstance(module, (torch.nn.Linear, Conv1D)) and not type(module).__module__.startswith("bitsandbytes")


def _should_convert_v5(full_name: str, patterns: list[str]) -> bool:
    # transformers 5's should_convert_module, for the transformers 4.x that pyproject allows (which has none)
    return not any(re.match(rf"(?:{k})(?:(?<=\.)|(?=\.|$))", full_name) or full_name.endswith(k) for k in patterns)


@functools.cache
def _stock_rule():
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:
        return _should_convert_v5
    return should_convert_module


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    """Whether module `name` stays float under `skip` (written as `llm_int8_skip_modules`), by stock
    transformers' own rule, so llmq converts exactly what a stock reload rebuilds as int8: a key matches as a
    regex from the start up to a module boundary (`lm_head`, `model.layers.1` but not `model.layers.11`), or
    as a plain suffix (`down_proj`, and also `proj`, which ends every `*_proj`)."""
    if not skip:
        return False
    try:
        return not _stock_rule()(name, list(skip))
    except re.error as e:
        raise ConfigError(f"quantization.skip (--skip) has an entry that is not a valid pattern ({e}); "
                          "give module names or name suffixes such as lm_head or down_proj") from None


def with_head(model, skip: tuple[str, ...]) -> tuple[str, ...]:
    """`skip`, plus the output embedding's own name where "lm_head" is in it and the model calls its head
    something else (BioGPT `output_projection`, RWKV `head`): kept float, as stock transformers keeps any
    output embedding, and written into llm_int8_skip_modules so that a stock reload keeps it float too."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if "lm_head" in skip and get is not None else None
    if head is None:
        return tuple(skip)
    return (*skip, *(n for n, m in model.named_modules() if m is head and n != "lm_head" and n not in skip))


def check_skip_matches(names: list[str], skip: tuple[str, ...]) -> None:
    """Warn about skip entries that match no module (a typo keeps nothing in float, silently otherwise);
    "lm_head" also stands for an output embedding of another name (`with_head`)."""
    for k in skip:
        if k == "lm_head" and "lm_head" not in names:
            continue
        if not any(skipped(n, (k,)) for n in names):
            log.warning("skip entry %r matches no module of this model: nothing is kept in float for it", k)


def linear_names(model, skip: tuple[str, ...] = ()) -> list[str]:
    """The linears quantize_ converts: exact nn.Linear / Conv1D outside `skip`.

    Raises UnsupportedArchitecture when that is none of them, or when what stock transformers would reload
    in float holds more than 1 - MIN_CONVERTED of the linear weights: nn.Linear subclasses, and the 3-D
    parameters of fused MoE experts (transformers 5 keeps Mixtral's or Qwen3-MoE's experts as one
    [experts, out, in] tensor per projection, which no bitsandbytes Int8 module holds). Smaller leftovers stay
    in float, with a warning."""
    from .arch import check_int8_supported

    check_int8_supported(getattr(getattr(model, "config", None), "model_type", None))
    skip = with_head(model, skip)
    names, done, left = [], 0, Counter()
    for n, m in model.named_modules():
        if skipped(n, skip):
            continue
        if _is_linear(m):
            names.append(n)
            done += m.weight.numel()
        elif _linear_like(m):
            left[type(m).__name__] += m.weight.numel()
        elif not isinstance(m, (torch.nn.Embedding, torch.nn.modules.conv._ConvNd)):
            for pn, p in m.named_parameters(recurse=False):  # fused MoE experts: [experts, out, in] parameters
                if p.ndim >= 3 and p.is_floating_point() and "embed" not in pn:  # (not Gemma 4's position table)
                    left[f"{type(m).__name__}'s {p.ndim}-D weights"] += p.numel()
    total = done + sum(left.values())
    kinds = ", ".join(f"{k} ({v / total:.0%} of the linear weights)" for k, v in left.most_common())
    if total == 0:
        raise UnsupportedArchitecture(f"no float nn.Linear or Conv1D layer outside skip {list(skip)} is left to "
                                      "convert to int8 (the model is int8 already, or --skip covers every "
                                      "linear); quantize the float model, or shorten --skip")
    if done < MIN_CONVERTED * total:
        raise UnsupportedArchitecture(
            f"only {len(names)} linear layers ({done / total:.0%} of the linear weights) can become int8; "
            f"left out: {kinds}: transformers' bitsandbytes loader rebuilds exact nn.Linear/Conv1D only, so "
            "the checkpoint would not reload as int8; keep this model in 16-bit")
    if left:
        log.warning("left in float (nn.Linear subclasses transformers would not reload as int8): %s", kinds)
    return names


def nonfinite_weight(model) -> str | None:
    """The name of the first resident floating-point parameter holding inf/nan, else None."""
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.device.type == "meta":
            continue
        # in chunks: isfinite makes full-size temporaries (|x| and masks), ~2x an embedding matrix at once
        if not all(torch.isfinite(c).all() for c in p.detach().reshape(-1).split(2**22)):
            return name
    return None


def check_finite_weights(model) -> None:
    name = nonfinite_weight(model)
    if name is not None:
        raise NumericalError.damaged(name)


def check_weight_range(w_max: float, name: str) -> None:
    """NumericalError unless a linear's largest |weight| (its largest row scale) fits float16, which
    bitsandbytes quantizes and computes through. The one check both converters (round-to-nearest, GPTQ) use."""
    if not w_max <= FP16_MAX:  # also catches nan
        raise NumericalError(f"the weights of {name} reach |w| = {w_max:.4g}, beyond the float16 range (65504) "
                             "that bitsandbytes quantizes through; use a smaller alpha (smoothing scales weights "
                             f"up) or keep that layer unquantized with --skip {name}")


def _to_int8(module, threshold: float, name: str = "linear"):
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    w = module.weight.data
    if isinstance(module, Conv1D):  # Conv1D stores [in, out]
        w = w.t()
    out_f, in_f = w.shape
    check_weight_range(float(w.abs().max()), name)
    new = bnb.nn.Linear8bitLt(in_f, out_f, bias=module.bias is not None, has_fp16_weights=False,
                              threshold=threshold, device="meta")
    # Int8Params quantizes in .to() only from a CPU tensor (bitsandbytes 0.50), onto the target device
    new.weight = bnb.nn.Int8Params(w.detach().to("cpu", torch.float16).contiguous(), requires_grad=False,
                                   has_fp16_weights=False)
    if module.bias is not None:
        new.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
    # A fresh module is in training mode, and on CPU bitsandbytes then silently takes its dequantize-and-
    # matmul path (MatMul8bitFp) whatever the threshold: keep the replaced module's mode.
    new.train(module.training)
    return new.to(w.device)  # Int8Params.to() quantizes: int8 rows + per-row scale SCB


def int8_linear(CB: torch.Tensor, SCB: torch.Tensor, bias: torch.Tensor | None, threshold: float, *,
                device: torch.device | str | None = None, training: bool = False):
    """A `Linear8bitLt` holding given int8 rows CB [out, in] and float32 scales SCB [out] (weight = CB * SCB / 127,
    e.g. from llmq/gptq.py) instead of quantizing a float weight; on `device` (default CB's), like `_to_int8`."""
    import bitsandbytes as bnb

    if CB.dtype != torch.int8 or CB.dim() != 2 or SCB.shape != (CB.shape[0],):
        raise ValueError(f"need CB int8 [out, in] and SCB [out], got {CB.dtype} {tuple(CB.shape)} and "
                         f"{tuple(SCB.shape)}")
    if not torch.isfinite(SCB).all():
        raise NumericalError("int8 row scales (SCB) hold inf/nan")
    out_f, in_f = CB.shape
    new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                              threshold=threshold, device="meta")
    new.weight = bnb.nn.Int8Params(CB.contiguous(), requires_grad=False, has_fp16_weights=False, CB=CB,
                                   SCB=SCB.float().contiguous())
    if bias is not None:
        new.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
    new.train(training)  # see _to_int8: training mode would silently dequantize on CPU
    return new.to(CB.device if device is None else device)


@torch.no_grad()
def quantize_(model, cfg: Quantization, progress: bool = True) -> list[str]:
    """Replace every nn.Linear/Conv1D outside `cfg.skip` with bnb Linear8bitLt, in place; returns the names.

    Also writes the bitsandbytes `quantization_config` into `model.config`, which is what lets stock
    `AutoModelForCausalLM.from_pretrained` rebuild the same modules from the saved folder.
    """
    names = linear_names(model, cfg.skip)
    replace_linears_(model, names, cfg, progress=progress)
    mark_quantized_(model, cfg)
    return names


def mark_quantized_(model, cfg: Quantization) -> None:
    """Record the bitsandbytes `quantization_config` in `model.config` (what stock from_pretrained reads)."""
    model.config.quantization_config = bnb_quantization_config(cfg, model)
    model.is_loaded_in_8bit = True


@torch.no_grad()
def replace_linears_(model, names: list[str], cfg: Quantization, progress: bool = False) -> None:
    """Swap the named linears of `model` (full names, e.g. from `linear_names`) for Int8 modules, in place.

    Shared by `quantize_` and llmq/stage.py (the whole model, or one decoder layer at a time)."""
    _silence_bnb()
    threshold = cfg.effective_threshold
    for name in tqdm(names, desc=f"int8 ({cfg.method})", unit="linear", disable=not progress):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _to_int8(getattr(owner, child), threshold, name))
    if names:
        log.debug("%s: %d linears -> int8 (threshold %g)", cfg.method, len(names), threshold)


def bnb_quantization_config(cfg: Quantization, model) -> dict:
    """The `quantization_config` that lets stock transformers rebuild the Int8 modules from config.json."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.effective_threshold,
                              llm_int8_skip_modules=list(with_head(model, cfg.skip))).to_dict()


@torch.inference_mode()
def check_fp16_range(model, ids: torch.Tensor, every: bool = False) -> None:
    """Run `ids` through an int8 model and fail, naming the layer, if an Int8 input leaves float16 range
    (bitsandbytes casts activations to fp16 before quantizing; bf16 models can exceed it) or goes non-finite,
    or a W8A8 output does (CUDA's int8_mm_dequant writes float16: inf on GPU although CPU computes it).
    `every`: check every Int8 module so (quantization.a16, where W8A8 modules have a threshold too)."""
    import bitsandbytes as bnb

    _silence_bnb()
    bad: list[str] = []

    def hook(name):
        def fn(module, args):
            amax = args[0].detach().abs().amax()
            if not bad and (not torch.isfinite(amax) or ((every or module.state.threshold == 0) and amax > FP16_MAX)):
                bad.append(f"{name} (|x| max {amax.item():.4g})")
        return fn

    def out_hook(name):
        def fn(module, args, out):
            amax = out.detach().abs().amax()
            if not bad and (every or module.state.threshold == 0) and not amax <= FP16_MAX:
                bad.append(f"the output of {name} (|y| max {amax.item():.4g})")
        return fn

    int8 = [(n, m) for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in int8]
    handles += [m.register_forward_hook(out_hook(n)) for n, m in int8]
    try:
        model(ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if bad:
        raise NumericalError(f"activation leaves the float16 range at {bad[0]}: W8A8 would produce inf/nan; "
                             "use a larger alpha, --dtype float32/float16, or --method llm-int8")
