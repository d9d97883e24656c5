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

import logging

import torch
from tqdm.auto import tqdm

from .config import Quantization
from .errors import NumericalError

log = logging.getLogger(__name__)
FP16_MAX = 65504.0


def _silence_bnb() -> None:
    # bitsandbytes warns on every forward that inputs are cast to fp16; that is the documented W8A8 path.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def _is_linear(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return type(module) in (torch.nn.Linear, Conv1D)


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    """`lm_head` skips `lm_head`, `x.lm_head` and everything under `lm_head.`; a full name skips that one."""
    return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip)


def linear_names(model, skip: tuple[str, ...] = ()) -> list[str]:
    return [n for n, m in model.named_modules() if _is_linear(m) and not skipped(n, skip)]


def check_finite_weights(model) -> None:
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.device.type == "meta":
            continue
        # in chunks: isfinite makes full-size temporaries (|x| and masks), ~2x an embedding matrix at once
        if not all(torch.isfinite(c).all() for c in p.detach().reshape(-1).split(2**22)):
            raise NumericalError(f"the model's weights hold inf/nan in {name}; the checkpoint is damaged "
                                 "(re-download or re-export it)")


def _to_int8(module, threshold: float, name: str = "linear"):
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    w = module.weight.data
    if isinstance(module, Conv1D):  # Conv1D stores [in, out]
        w = w.t()
    out_f, in_f = w.shape
    w_max = float(w.abs().max())
    if not w_max <= FP16_MAX:  # also catches nan
        raise NumericalError(f"the weights of {name} reach |w| = {w_max:.4g}, beyond the float16 range (65504) "
                             "that bitsandbytes quantizes through; use a smaller alpha (smoothing scales weights "
                             f"up) or keep that layer unquantized with --skip {name}")
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
    model.config.quantization_config = bnb_quantization_config(cfg)
    model.is_loaded_in_8bit = True
    log.info("%s: %d linears -> int8 (threshold %g)", cfg.method, len(names), cfg.effective_threshold)
    return names


@torch.no_grad()
def replace_linears_(model, names: list[str], cfg: Quantization, progress: bool = False) -> None:
    """Swap the named linears of `model` (full names, e.g. from `linear_names`) for Int8 modules, in place.

    Shared by `quantize_` (whole model) and llmq/sequential.py (one decoder layer at a time)."""
    _silence_bnb()
    threshold = cfg.effective_threshold
    for name in tqdm(names, desc=f"int8 ({cfg.method})", unit="linear", disable=not progress):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _to_int8(getattr(owner, child), threshold, name))


def bnb_quantization_config(cfg: Quantization) -> dict:
    """The `quantization_config` that lets stock transformers rebuild the Int8 modules from config.json."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=cfg.effective_threshold,
                              llm_int8_skip_modules=list(cfg.skip)).to_dict()


@torch.inference_mode()
def check_fp16_range(model, ids: torch.Tensor) -> None:
    """Run `ids` through an int8 model and fail, naming the layer, if an Int8 input leaves float16 range
    (bitsandbytes casts activations to fp16 before quantizing; bf16 models can exceed it) or goes non-finite."""
    import bitsandbytes as bnb

    _silence_bnb()
    bad: list[str] = []

    def hook(name):
        def fn(module, args):
            amax = args[0].detach().abs().amax()
            if not bad and (not torch.isfinite(amax) or (module.state.threshold == 0 and amax > FP16_MAX)):
                bad.append(f"{name} (|x| max {amax.item():.4g})")
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, bnb.nn.Linear8bitLt)]
    try:
        model(ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if bad:
        raise NumericalError(f"activation leaves the float16 range at {bad[0]}: W8A8 would produce inf/nan; "
                             "use a larger alpha, --dtype float32/float16, or --method llm-int8")
