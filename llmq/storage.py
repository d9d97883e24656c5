"""The dtype of what stays float in a quantized model: embeddings, norms, lm_head, biases ("storage dtype").

Conversion leaves int8 weights with float32 row scales (`SCB`) in the Int8 linears; every other tensor is
still in the dtype the model was calibrated in (float32 on CPU), which on SmolLM2-135M is a tied 49152 x 576
embedding, more bytes than all the int8 linears together. Stock `from_pretrained` runs those tensors in the
`dtype` that config.json records, so three things must agree: the checkpoint's bytes, config.json's `dtype`,
and the in-memory model that llmq checks (fp16 range) and evaluates. `cast_unquantized_` makes them agree,
using from_pretrained's own rule for modules that a model keeps in float32 (`_keep_in_fp32_modules*`).
`SCB` stays float32 (bitsandbytes' format); buffers that are not saved are rebuilt by from_pretrained as the
model's `__init__` makes them under the default dtype `dtype` (rotary `inv_freq` in float32, XGLM's sinusoidal
positions in `dtype`): the in-memory model's get the dtypes of such a rebuild (`_rebuilt_buffers_`).

`auto` = the run dtype when it is 16-bit (CUDA's float16 default: nothing changes). From a float32 run (CPU's
default) it is float16 when the run measured the range and it fits: every activation the converted decoder
layers produced on the calibration windows (each module's output, and layer 0's input) and every non-int8
weight stays within half the float16 range (`FP16_HEADROOM`, a margin for text calibration never saw).
Otherwise bfloat16: float32's exponent range, so nothing that was finite in float32 overflows. float16 is
the better default where it fits: bitsandbytes computes the int8 linears in float16, so bfloat16's coarser
mantissa adds error that float16 does not (SmolLM2 weight-only: KL 0.0053 -> 0.0037, docs/benchmarks.md),
GPUs before Ampere have no bfloat16, and this CPU runs float16 faster than bfloat16. Gemma 3's residual
stream reaches ~1e5 (beyond float16): auto stays bfloat16 there. A run with no calibration text has not
measured the range and stays bfloat16.
"""

from __future__ import annotations

import logging

import torch

from .quantize import FP16_MAX

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FP16_HEADROOM = 2.0  # auto's float16 needs every measured |value| <= FP16_MAX / FP16_HEADROOM


def measures_range(name: str, run_dtype: torch.dtype) -> bool:
    """Whether `storage_dtype(name, run_dtype, ...)` depends on the measured range (auto from a float32 run)."""
    return name == "auto" and run_dtype not in (torch.float16, torch.bfloat16)


def storage_dtype(name: str, run_dtype: torch.dtype, value_max: float | None = None) -> torch.dtype:
    """The storage dtype that `name` (quantization.storage_dtype) means for a model run in `run_dtype`;
    `value_max`: the largest |activation or non-int8 weight| the run measured (None: not measured)."""
    if name != "auto":
        return DTYPES[name]
    if not measures_range(name, run_dtype):
        return run_dtype
    fits = value_max is not None and value_max * FP16_HEADROOM <= FP16_MAX  # nan compares False
    return torch.float16 if fits else torch.bfloat16


def why(dtype: torch.dtype, name: str, run_dtype: torch.dtype, value_max: float | None) -> str:
    """One line on why the non-int8 tensors are stored in `dtype` (the report's and the log's)."""
    short = str(dtype).removeprefix("torch.")
    if not measures_range(name, run_dtype):
        return f"{short} ({'asked' if name != 'auto' else 'auto: the run dtype'})"
    if value_max is None:
        return f"{short} (auto: no calibration text ran, so the float16 range was not measured)"
    return (f"{short} (auto: largest activation or weight |{value_max:.4g}| "
            f"{'within' if dtype == torch.float16 else 'beyond'} half the float16 range)")


def value_max(model: torch.nn.Module, *, only: str = "") -> float:
    """The largest |value| of the float tensors that `cast_unquantized_` would cast (not int8, not SCB; under
    the name prefix `only`; meta tensors skipped)."""
    m = 0.0
    for name, t in _saved(model, only):
        if t.is_floating_point() and not name.endswith("SCB") and t.device.type != "meta" and t.numel():
            m = max(m, t.detach().abs().amax().item())
    return m


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
        _rebuilt_buffers_(model, dtype)
    return saved


def _rebuilt_buffers_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast each unsaved float buffer of `model` to the dtype from_pretrained(dtype=`dtype`) gives it: the
    dtype of the same buffer in a skeleton built under that default dtype (weights on meta, buffers real).
    Without it, XGLM's float32 positions turn a float16 model's hidden states float32 (its norms then fail)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights(include_buffers=False):
            ref = type(model)._from_config(model.config, dtype=dtype)
    except Exception as e:  # a family whose __init__ cannot run this way: leave its buffers as they are
        log.debug("no skeleton to match unsaved buffers: %s", e)
        return
    want = {n: b.dtype for n, b in ref.named_buffers()}
    for mname, mod in model.named_modules():
        for bname in mod._non_persistent_buffers_set:
            b, name = mod._buffers.get(bname), f"{mname}.{bname}" if mname else bname
            if b is not None and b.is_floating_point() and want.get(name, b.dtype) != b.dtype:
                mod._buffers[bname] = b.to(want[name])


def to_storage_dtype_(model: torch.nn.Module, name: str, act_max: float | None = None) -> dict:
    """After conversion to int8: cast what stays float to the storage dtype `name` (quantization.storage_dtype);
    `act_max`: the largest |activation| measured on the calibration windows (None: none ran). Returns the
    report's `storage` entry."""
    run = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    vmax = None
    if measures_range(name, run) and act_max is not None:
        vmax = max(act_max, value_max(model))
    dtype = storage_dtype(name, run, vmax)
    saved = cast_unquantized_(model, dtype)
    log.info("the non-int8 tensors take %.1f MB less than in %s", saved / 2**20, str(run).removeprefix("torch."))
    return storage_entry(dtype, name, run, vmax)


def storage_entry(dtype: torch.dtype, name: str, run: torch.dtype, vmax: float | None) -> dict:
    """The report's `storage` entry, logged."""
    reason = why(dtype, name, run, vmax)
    log.info("non-int8 tensors stored and run in %s", reason)
    return {"dtype": str(dtype).removeprefix("torch."), "asked": name, "value_max": vmax, "why": reason}
