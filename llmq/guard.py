"""The end-to-end guard of `--alpha auto`: a choice the code makes is checked on windows it did not see.

After the auto model is built, the same recipe is quantized twice more, with alpha 0 (no smoothing: naive
W8A8) and with the family's published alpha (llmq/arch.py), and each model's KL(FP || int8), top-1
agreement and NLL are measured on calibration windows held out from calibration and the alpha search
(llmq.evaluate's protocol, windows of calibration.seq_len). The model with the lowest KL ships: auto is
never worse than alpha 0 on the guard's KL, and the report says when it fell back. Each candidate is
built from a fresh load of the float model; at most the float reference, the auto model and one rival
are in memory at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .config import Recipe

log = logging.getLogger(__name__)


@dataclass
class GuardResult:
    """The guard's measurements: candidate name -> {alpha, kl_divergence, top1_agreement, nll}."""

    chosen: str
    held_out_tokens: int
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def fell_back(self) -> bool:
        return self.chosen != "auto"


def rivals(recipe: Recipe, model_type: str) -> dict[str, Recipe]:
    """The fixed-alpha recipes auto is checked against: alpha 0, and the family's alpha where it has one."""
    from .arch import ARCHS

    out = {"alpha 0": replace(recipe, smoothing=replace(recipe.smoothing, alpha=0.0))}
    arch = ARCHS.get(model_type)
    if arch is not None:
        out[f"family alpha {arch.alpha:g}"] = replace(recipe, smoothing=replace(recipe.smoothing, alpha=arch.alpha))
    return out


def split_windows(windows: torch.Tensor, held: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows): every k-th window is held out, spread over the text."""
    if held <= 0:
        return windows, windows[:0]
    n = windows.shape[0]
    pick = torch.linspace(0, n - 1, held).round().long().unique()
    keep = torch.ones(n, dtype=torch.bool)
    keep[pick] = False
    return windows[keep], windows[pick]


def _score(model, reference, held: torch.Tensor) -> dict[str, float]:
    from .evaluate import evaluate_ids

    r = evaluate_ids(model, held.reshape(-1), held.shape[1], reference=reference, progress=False)
    return {"kl_divergence": r.kl_divergence, "top1_agreement": r.top1_agreement, "nll": r.nll}


def guard_(model, recipe: Recipe, held: torch.Tensor, load_fp: Callable[[], Any],
           build: Callable[[Recipe], tuple[Any, Any]]) -> tuple[Any, Any, GuardResult]:
    """Compare the quantized auto `model` with its rivals on `held` windows. `load_fp()` loads the float
    reference; `build(recipe)` returns (a quantized model, what its build reported). Returns (the winner,
    its build's payload or None when auto wins, the measurements)."""
    fp = load_fp()
    result = GuardResult("auto", int(held.shape[0] * (held.shape[1] - 1)))
    result.candidates["auto"] = {"alpha": "auto", **_score(model, fp, held)}
    best, payload, best_kl = model, None, result.candidates["auto"]["kl_divergence"]
    for name, rec in rivals(recipe, model.config.model_type).items():
        rival, got = build(rec)
        result.candidates[name] = {"alpha": rec.smoothing.alpha, **_score(rival, fp, held)}
        kl = result.candidates[name]["kl_divergence"]
        if kl < best_kl:
            best, payload, best_kl, result.chosen = rival, got, kl, name
        del rival, got
    del fp
    if result.fell_back:
        log.warning("guard: auto's held-out KL %.4g is above %s's %.4g; shipping %s",
                    result.candidates["auto"]["kl_divergence"], result.chosen, best_kl, result.chosen)
    else:
        log.info("guard: auto kept (held-out KL %.4g; %s)", best_kl,
                 ", ".join(f"{k} {v['kl_divergence']:.4g}" for k, v in result.candidates.items() if k != "auto"))
    return best, payload, result
