"""The benchmark scripts' only entry into llmq modules that are being restructured (llmq/pipeline.py,
llmq/simulate.py). Repoint these few lines when those functions move; nothing else in scripts/ changes."""

from __future__ import annotations

from typing import Any


def calibration_windows(tokenizer: Any, recipe: Any) -> Any:
    """The [samples, seq_len] windows `llmq quantize` calibrates on for `recipe` (same tokenization)."""
    from llmq.pipeline import _calibration_windows

    return _calibration_windows(tokenizer, recipe)


def versions() -> dict[str, str]:
    """llmq, torch, transformers and bitsandbytes versions, as the quantization report records them."""
    from llmq.pipeline import versions as _versions

    return _versions()


def sim_mode(act: str, weight: str) -> Any:
    from llmq.simulate import SimMode

    return SimMode(act, weight)


def simulated_perplexity(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from llmq.simulate import simulated_perplexity as _sim

    return _sim(*args, **kwargs)
