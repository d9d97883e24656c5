"""llmq: INT8 quantization of Hugging Face causal LMs (SmoothQuant W8A8, LLM.int8, W8A16) with
bitsandbytes, and the evidence of what it cost.

    import llmq
    model, tok = llmq.load("llmq:smollm2")
    report, stats = llmq.quantize_model_(model, tok, llmq.Recipe())   # calibrate -> smooth_ -> quantize_
    llmq.evaluate(model, tok, llmq.Evaluation())
    llmq.decode_speed(model, tok, llmq.Decode())                      # generation tokens/s, KV cache, batch 1

The public names are imported lazily, so `import llmq` and `llmq --help` stay fast.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Recipe": "config", "Calibration": "config", "Smoothing": "config", "Quantization": "config",
    "Evaluation": "config", "Push": "config",
    "load": "load", "calibrate": "calibrate", "smooth_": "smooth", "quantize_": "quantize",
    "quantize_model_": "run", "run": "run", "save_checkpoint": "save",
    "evaluate": "evaluate", "push": "hub", "write_card": "hub", "export": "export",
    "Decode": "speed", "decode_speed": "speed", "compare_decode": "speed",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'llmq' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`import llmq.evaluate` would rebind `llmq.evaluate` to the submodule; keep the public function
    (likewise `load` and `calibrate`). The submodules stay importable as `from llmq.evaluate import ...`."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
