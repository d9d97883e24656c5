"""The end-to-end guard of `--alpha auto`: a choice the code makes is checked on windows it did not see.

After the auto model is built, the same recipe is quantized again with alpha 0 (no smoothing: naive W8A8, or
weight-only without rescaling), for W8A8 with the family's published alpha (llmq/arch.py), and, with
`calibration.statistic: auto` (the default), with auto under the window-mean statistic (llmq/calibrate.py: on some
models it beats the maximum, on others not, so the held-out windows decide), and each model's KL(FP || int8),
top-1 agreement and NLL are measured on calibration windows held out from calibration and the alpha search
(llmq.evaluate's protocol, windows of calibration.seq_len). The model with the lowest KL ships: auto is never
worse than alpha 0 on the guard's KL, and the report says when it fell back. With GPTQ, the winner is then built
once more with the first position of each window weighted the other way in GPTQ's Hessians
(`quantization.gptq_sink`: it lowers KL on SmolLM2 and raises it on Gemma 3, docs/benchmarks.md "The first
position in GPTQ's Hessians"), and the lower KL ships. Each candidate is built from a fresh load of the float
model. The float model's logits on the held-out windows are computed once and kept in a temporary file
(`reference_logits`, unless they outweigh the model), so without --max-kl the float reference is not in memory
during the guard: the auto model, the best rival so far and the one being built.
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


def rivals(recipe: Recipe, model_type: str, window_mean: bool = False) -> dict[str, Recipe]:
    """The recipes auto is checked against: alpha 0, the family's alpha where it has one (W8A8 only: the
    published alphas are SmoothQuant's, not weight-only scaling's), with --rotate the same auto search on
    the unrotated model (so asking for the rotation never ships a worse model), and with `window_mean` (the
    statistic was auto, resolved to the max) the same auto search under the window mean."""
    from .arch import ARCHS

    out = {"alpha 0": replace(recipe, smoothing=replace(recipe.smoothing, alpha=0.0))}
    arch = ARCHS.get(model_type)
    if arch is not None and recipe.quantization.method == "smoothquant":
        out[f"family alpha {arch.alpha:g}"] = replace(recipe, smoothing=replace(recipe.smoothing, alpha=arch.alpha))
    if recipe.quantization.rotate is True:  # as resolved (llmq/run.py resolve_rotate); "auto" is not yet
        out["auto, no rotation"] = replace(recipe, quantization=replace(recipe.quantization, rotate=False),
                                           calibration=replace(recipe.calibration, act_scales=None))
    if window_mean and recipe.calibration.statistic == "max":
        out["auto, window mean"] = replace(recipe, calibration=replace(recipe.calibration, statistic="window-mean"))
    return out


def sink_rival(recipe: Recipe) -> tuple[str, Recipe] | None:
    """(name, recipe) of `recipe` with GPTQ's first-position weighting flipped (llmq/gptq.py `Hessians`), or None
    without GPTQ."""
    q = recipe.quantization
    if not q.gptq:
        return None
    return ("equal GPTQ weights" if q.gptq_sink else "GPTQ sink weighted",
            replace(recipe, quantization=replace(q, gptq_sink=not q.gptq_sink)))


def split_windows(windows: torch.Tensor, held: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows): every k-th window is held out, spread over the text."""
    if held <= 0:
        return windows, windows[:0]
    n = windows.shape[0]
    pick = torch.linspace(0, n - 1, held).round().long().unique()
    keep = torch.ones(n, dtype=torch.bool)
    keep[pick] = False
    return windows[keep], windows[pick]


def reference_logits(fp, held: torch.Tensor):
    """`fp`'s logits on the `held` windows in a temporary file (llmq.compare.ReferenceLogits, rows x vocab in
    the logits' dtype), to score every candidate against: the float model runs once and need not stay
    resident. Returns `fp` itself instead when those logits are larger than its weights (a small model with
    a large vocabulary, e.g. Gemma 3 270M: 2.1 GB of logits on 4 x 512 tokens against 1.1 GB of float32
    weights), since a temporary folder in memory (tmpfs) would then hold more than the model. The caller
    closes a store."""
    from .compare import ReferenceLogits
    from .evaluate import evaluate_ids
    from .memory import weight_bytes

    rows = held.shape[0] * (held.shape[1] - 1)
    if rows * fp.config.get_text_config().vocab_size * fp.dtype.itemsize > weight_bytes(fp):
        return fp
    store = ReferenceLogits(rows)
    try:
        evaluate_ids(fp, held.reshape(-1), held.shape[1], record=store, progress=False)
    except BaseException:
        store.close()
        raise
    return store


def _score(model, reference, held: torch.Tensor) -> dict[str, float]:
    from .evaluate import evaluate_ids

    r = evaluate_ids(model, held.reshape(-1), held.shape[1], reference=reference, progress=False)
    return {"kl_divergence": r.kl_divergence, "top1_agreement": r.top1_agreement, "nll": r.nll}


def guard_(model, recipe: Recipe, held: torch.Tensor, fp, build: Callable[[Recipe], tuple[Any, Any]],
           window_mean: bool = False) -> tuple[Any, Any, GuardResult]:
    """Compare the quantized auto `model` with its `rivals` on `held` windows against the float reference `fp`
    (a model, or its `reference_logits`);
    `build(recipe)` returns (a quantized model, what its build reported). Returns (the winner, its build's
    payload or None when auto wins, the measurements)."""
    result = GuardResult("auto", int(held.shape[0] * (held.shape[1] - 1)))
    result.candidates["auto"] = {"alpha": "auto", **_score(model, fp, held)}
    best, payload, best_kl = model, None, result.candidates["auto"]["kl_divergence"]
    others = rivals(recipe, model.config.model_type, window_mean)
    log.info("guard: auto's held-out KL %.4g (%d tokens); building %d rivals, one build each: %s",
             best_kl, result.held_out_tokens, len(others), "; ".join(others))

    def try_(name: str, rec: Recipe) -> None:
        nonlocal best, payload, best_kl
        rival, got = build(rec)
        result.candidates[name] = {"alpha": rec.smoothing.alpha, **_score(rival, fp, held)}
        kl = result.candidates[name]["kl_divergence"]
        log.info("guard: %s: held-out KL %.4g", name, kl)
        if kl < best_kl:
            best, payload, best_kl, result.chosen = rival, got, kl, name

    for i, (name, rec) in enumerate(others.items(), 1):
        log.info("guard: building %s (%d of %d)", name, i, len(others))
        try_(name, rec)
    flip = sink_rival(recipe if result.chosen == "auto" else others[result.chosen])
    if flip is not None:
        name = f"{result.chosen}, {flip[0]}"
        log.info("guard: building %s (the lowest so far, GPTQ's first position weighted the other way)", name)
        try_(name, flip[1])
    if result.chosen.startswith("auto, "):  # the same search, the other rotation or statistic
        log.info("guard: %s shipped (held-out KL %.4g; auto %.4g)", result.chosen, best_kl,
                 result.candidates["auto"]["kl_divergence"])
    elif result.fell_back:
        log.warning("guard: auto's held-out KL %.4g is above %s's %.4g; shipping %s",
                    result.candidates["auto"]["kl_divergence"], result.chosen, best_kl, result.chosen)
    else:
        log.info("guard: auto kept (held-out KL %.4g; %s)", best_kl,
                 "; ".join(f"{k} {v['kl_divergence']:.4g}" for k, v in result.candidates.items() if k != "auto"))
    return best, payload, result


def _swap_(model, name: str, module) -> Any:
    """Put `module` at `name` (on the model's device); return the module that was there."""
    emb = model.get_input_embeddings().weight  # the storage dtype of what is not int8
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    old = getattr(owner, child)
    int8 = hasattr(module, "state")  # bitsandbytes' Linear8bitLt: its int8 weights keep their dtype
    setattr(owner, child, module.to(emb.device) if int8 else module.to(emb.device, emb.dtype))
    return old


@torch.inference_mode()
def rank_by_kl(model, windows: torch.Tensor, fp, originals: dict[str, Any], progress: bool = False,
               ) -> dict[str, float]:
    """Each int8 linear's end-to-end cost: KL(FP || model) on `windows` (calibration windows, not the held-out
    ones) with only that linear in int8 and every other one put back in float (modules from `originals`), less
    the KL with all of them in float (what the storage dtype costs alone). One forward pass per linear; the
    float reference's log-probabilities are computed once; the model is left as it came.

    Why this measure (SmolLM2, W8A8 auto, --max-kl 0.005): by each linear's own relative output error, 51
    linears had to be kept (it ignores how an error passes through the layers after it: layer 2's down_proj
    ranked 29th); by "every linear in int8 but this one", 80 (that difference is dominated by the cross terms
    with all the other linears' errors, noise on 1,024 tokens); by this one, 19."""
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .evaluate import input_device

    def logp(m, w):
        return F.log_softmax(m(w[None].to(input_device(m)), use_cache=False).logits[0].float(), dim=-1)

    ref = [logp(fp, w) for w in windows]

    def kl() -> float:
        terms = (F.kl_div(logp(model, w), r.to(input_device(model)), reduction="none", log_target=True)
                 for w, r in zip(windows, ref, strict=True))
        return sum(t.sum(dtype=torch.float64).item() for t in terms) / windows.numel()

    int8 = {n: _swap_(model, n, originals[n]) for n in originals}
    out = {}
    try:
        floor = kl()  # every linear in float, in the storage dtype: that dtype's own KL
        for n in tqdm(sorted(originals), desc="--max-kl: rank linears", unit="linear", disable=not progress):
            _swap_(model, n, int8[n])
            out[n] = kl() - floor
            _swap_(model, n, originals[n])
    finally:
        for n, m in int8.items():
            _swap_(model, n, m)
    return out


def keep_sensitive_(model, held: torch.Tensor, fp, q, res, rank_on: torch.Tensor, progress: bool = False,
                    ) -> dict[str, Any]:
    """--max-kl: put back the float (smoothed) modules of the int8 linears that cost the most KL to FP on their
    own (`rank_by_kl` on the calibration windows `rank_on`), until the KL on the held-out windows is at most
    `q.max_kl`. The count doubles until the target is met, then bisects down to the fewest that meet it. The
    kept linears join `llm_int8_skip_modules`, so stock from_pretrained loads them as plain float linears. KL
    is against the float reference `fp`. Returns the report entry: target, KL before and after, the linears
    kept, the bytes they add over int8, and each linear's measured effect (the first ten at least)."""
    steps = {0: _score(model, fp, held)["kl_divergence"]}
    effect = rank_by_kl(model, rank_on, fp, res.originals, progress) if steps[0] > q.max_kl else {}
    ranked = sorted(effect, key=lambda n: (-effect[n], n))
    if effect:
        log.info("--max-kl: KL added by each linear alone in int8 (%d calibration tokens), summed over all %d: %.4g",
                 rank_on.numel(), len(effect), sum(effect.values()))
    int8: dict[str, Any] = {}  # name -> its int8 module while the float one is in place

    def kl_with(k: int, fp=fp) -> float:
        want = set(ranked[:k])
        for n in [n for n in int8 if n not in want]:
            _swap_(model, n, int8.pop(n))
        for n in [n for n in ranked[:k] if n not in int8]:
            int8[n] = _swap_(model, n, res.originals[n])
        return _score(model, fp, held)["kl_divergence"]

    k = 0
    while steps[k] > q.max_kl and k < len(ranked):
        k = min(len(ranked), max(1, 2 * k))
        steps[k] = kl_with(k)
    lo = max((j for j in steps if steps[j] > q.max_kl), default=0)
    while steps[k] <= q.max_kl and k - lo > 1:  # the fewest linears that still meet the target
        mid = (lo + k) // 2
        steps[mid] = kl_with(mid)
        lo, k = (mid, k) if steps[mid] > q.max_kl else (lo, mid)
    if set(int8) != set(ranked[:k]):
        kl_with(k)
    kept = ranked[:k]
    qc = model.config.quantization_config
    qc["llm_int8_skip_modules"] = list(qc.get("llm_int8_skip_modules") or []) + kept
    extra = sum(w.numel() * w.element_size() - w.numel() - 4 * w.shape[0]
                for w in (res.originals[n].weight for n in kept))
    met = steps[k] <= q.max_kl
    (log.info if met else log.warning)("--max-kl %g: %d linears kept in 16-bit, held-out KL %.4g -> %.4g%s",
                                       q.max_kl, k, steps[0], steps[k], "" if met else " (target not reached)")
    return {"max_kl": q.max_kl, "met": met, "kl_before": steps[0], "kl_after": steps[k], "kept": kept,
            "extra_bytes": int(extra), "steps": {str(j): v for j, v in sorted(steps.items())},
            "rank_tokens": int(rank_on.numel()) if effect else 0,
            "kl_added": {n: effect[n] for n in ranked[:max(k, 10)]}}  # each alone in int8, costliest first
