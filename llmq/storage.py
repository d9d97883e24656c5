"""The dtype of what stays float in a quantized model: embeddings, norms, lm_head, biases ("storage dtype").

Conversion leaves int8 weights with float32 row scales (`SCB`) in the Int8 linears; every other tensor is
still in the dtype the model was calibrated in (float32 on CPU), which on SmolLM2-135M is a tied 49152 x 576
embedding, more bytes than all the int8 linears together. Stock `from_pretrained` runs those tensors in the
`dtype` that config.json records, so three things must agree: the checkpoint's bytes, config.json's `dtype`,
and the in-memory model that llmq checks (fp16 range) and evaluates. `cast_unquantized_` makes them agree,
using from_pretrained's own rule for modules that a model keeps in float32 (`_keep_in_fp32_modules*`).
`SCB` stays float32 (bitsandbytes' format); buffers that are not saved (rotary `inv_freq`) are left alone,
since from_pretrained rebuilds them rather than loading them.

`auto` = the run dtype when it is 16-bit (CUDA's float16 default: nothing changes), else bfloat16: float32's
exponent range, so no tensor or activation that was finite in float32 overflows (float16 would risk that).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def storage_dtype(name: str, run_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype that `name` (quantization.storage_dtype) means for a model run in `run_dtype`."""
    if name == "auto":
        return run_dtype if run_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    return DTYPES[name]


def _kept_fp32(model: torch.nn.Module, dtype: torch.dtype):
    """from_pretrained's test for tensors it loads in float32 whatever `dtype` (None: no such tensors)."""
    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return None
    from transformers.core_model_loading import build_glob_alternation

    return build_glob_alternation(list(plan))[0]


def _stored(name: str, t: torch.Tensor, dtype: torch.dtype, kept) -> torch.dtype:
    if not t.is_floating_point() or name.endswith("SCB") or (kept is not None and kept.search(name)):
        return t.dtype
    return dtype


def stored_dtype(model: torch.nn.Module, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype that state-dict entry `name` of `model` (now `t`) has in a checkpoint stored in `dtype`."""
    return _stored(name, t, dtype, _kept_fp32(model, dtype))


def _saved(model: torch.nn.Module, only: str):
    for name, p in model.named_parameters():
        if name.startswith(only):
            yield name, p
    for mname, mod in model.named_modules():
        for bname, b in mod._buffers.items():
            name = f"{mname}.{bname}" if mname else bname
            if b is not None and bname not in mod._non_persistent_buffers_set and name.startswith(only):
                yield name, b


@torch.no_grad()
def cast_unquantized_(model: torch.nn.Module, dtype: torch.dtype, *, only: str = "") -> int:
    """Cast every saved float tensor of `model` (under the name prefix `only`) but int8 state to `dtype`, in
    place, and record `dtype` in `model.config` (what from_pretrained loads them in). Returns bytes saved."""
    kept = _kept_fp32(model, dtype)
    saved = 0
    for name, t in _saved(model, only):
        to = _stored(name, t, dtype, kept)
        if t.dtype != to and t.device.type != "meta":
            saved += t.numel() * (t.element_size() - to.itemsize)
            t.data = t.data.to(to)
    config = getattr(model, "config", None)
    if config is not None and not only:
        config.dtype = dtype
    return saved


def to_storage_dtype_(model: torch.nn.Module, name: str) -> torch.dtype:
    """After conversion to int8: cast what stays float to the storage dtype `name` (quantization.storage_dtype)."""
    run = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    dtype = storage_dtype(name, run)
    saved = cast_unquantized_(model, dtype)
    log.info("non-int8 tensors stored and run in %s (%.1f MB less than %s)", str(dtype).removeprefix("torch."),
             saved / 2**20, str(run).removeprefix("torch."))
    return dtype
