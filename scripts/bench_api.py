"""The benchmark scripts' entry into llmq's run path (llmq/run.py) and simulation (llmq/simulate.py)."""

from __future__ import annotations

from typing import Any


def calibration_windows(tokenizer: Any, recipe: Any) -> Any:
    """The [samples, seq_len] windows `llmq quantize` calibrates on for `recipe` (same tokenization and the
    same split: with auto alpha the guard's held-out windows are not among them)."""
    from llmq.data import calibration_set
    from llmq.run import calibration_split

    windows = calibration_split(tokenizer, recipe, None)[0]
    # a recipe that reads no calibration text (llm-int8 / weight-only without GPTQ): the windows it would read,
    # so "quantize time / one FP forward over the calibration tokens" keeps one denominator for every row
    return calibration_set(tokenizer, recipe.calibration) if windows is None else windows


def versions() -> dict[str, str]:
    """llmq, torch, transformers and bitsandbytes versions, as the quantization report records them."""
    from llmq.run import versions as _versions

    return _versions()


def sim_mode(act: str, weight: str) -> Any:
    from llmq.simulate import SimMode

    return SimMode(act, weight)


def simulated_perplexity(*args: Any, **kwargs: Any) -> dict[str, Any]:
    from llmq.simulate import simulated_perplexity as _sim

    return _sim(*args, **kwargs)
