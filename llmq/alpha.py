"""`--alpha auto`: per smoothing group, the alpha of `grid` (which includes 0 = no smoothing) whose smoothed,
int8-simulated output of the consuming linears is closest to the float output on calibration rows.

For a group with input sample X (calibration rows) and consuming weights W (stacked, [out, in]):
    err(a) = || fq_token(X / s_a) @ fq_channel(W * s_a)^T - X @ W^T ||_F^2
fq_token/fq_channel are bitsandbytes' W8A8 layout (per-token activations, per-output-channel weights); the
simulated granularities of llmq/simulate.py pass their own error function to the same search.
Alpha 0 is always a candidate, so the chosen error is never above no smoothing's. Groups are searched in
table order and each chosen scale is applied before the next group is searched, so weight maxima are
always those of the model as it will be quantized.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence

import torch
from tqdm.auto import tqdm

from .calibrate import CalibrationStats
from .errors import ConfigError
from .fakequant import fq
from .smooth import SmoothTarget, act_max, apply_scales_, expand_to_inputs, linear_weight, smoothing_scales, weight_max

log = logging.getLogger(__name__)
SWEEP_RADIUS = 0.2  # the layer-output sweep tries grid values this close to a group's start (and 0)
REFINE_STEPS, REFINE_LR, REFINE_CHECK = 40, 0.04, 10  # `refine_scales`: Adam steps, rate, exact check every N
REFINE_BOUND = 16.0  # a refined scale stays within [1/16, 16] of the alpha formula's
PIECE = 2**22  # the group errors and `refine_scales` take this many stacked weight entries at a time (16 MB float32)

# err(x, w, s_in, ref, x_max): x [rows, in], w [out, in] (the group's linears stacked), s_in [in] input-space
# scales, ref = x @ w.T, x_max [in] calibrated abs-max of the unsmoothed input -> squared error
ErrorFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], float]


def w8a8_error(x: torch.Tensor, w: torch.Tensor, s_in: torch.Tensor, ref: torch.Tensor,
               x_max: torch.Tensor | None = None) -> float:
    """Squared error of bitsandbytes' W8A8 (per-token activations, per-row weights) after smoothing by s_in."""
    return _rows_error(fq(x / s_in, dim=-1), w, s_in, ref)


def weight_only_error(x: torch.Tensor, w: torch.Tensor, s_in: torch.Tensor, ref: torch.Tensor,
                      x_max: torch.Tensor | None = None) -> float:
    """Squared error of int8 per-row weights (W8A16: the input stays float) after rescaling by s_in."""
    return _rows_error(x / s_in, w, s_in, ref)


def _rows_error(xq: torch.Tensor, w: torch.Tensor, s_in: torch.Tensor, ref: torch.Tensor) -> float:
    """||xq @ fq_channel(w * s_in)^T - ref||^2, w's rows a PIECE of entries at a time (its rows round
    independently), so the temporaries stay ~16 MB whatever the group's size (an 8B model's gate+up: 470 MB)."""
    rows = max(1, PIECE // w.shape[1])
    if w.shape[0] <= rows:  # one piece: the sum in one reduction, as before pieces existed
        return float((xq @ fq(w * s_in, dim=-1).t() - ref).pow(2).sum())
    return sum(float((xq @ fq(w[lo:lo + rows] * s_in, dim=-1).t() - ref[:, lo:lo + rows]).pow(2).sum())
               for lo in range(0, w.shape[0], rows))


def group_error(act: str) -> ErrorFn:
    """The per-group error for llmq/stage.py's simulated input ("token": W8A8, "none": weight-only)."""
    return weight_only_error if act == "none" else w8a8_error


@torch.no_grad()
def search_alpha_(model, targets: Sequence[SmoothTarget], stats: CalibrationStats, grid: Sequence[float],
                  error: ErrorFn = w8a8_error, progress: bool = True,
                  ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Pick and apply, in place, the best alpha per target under `error`. Returns (alpha per key, error per
    alpha per key)."""
    chosen: dict[str, float] = {}
    errors: dict[str, dict[str, float]] = {}
    for t in tqdm(targets, desc="alpha search", unit="group", disable=not progress):
        first = t.linear_names[0]
        if first not in stats.samples:
            raise ConfigError(f"no calibration rows for {first}; calibrate with sample_names and sample_tokens")
        x = stats.samples[first].float()
        w = _stacked_weight(model, t).cpu()
        ref = x @ w.t()
        amax, wmax = act_max(t, stats.act_max), weight_max(model, t).float().cpu()
        x_max = stats.act_max[first].float().cpu()
        errs = {a: error(x, w, expand_to_inputs(t, smoothing_scales(amax, wmax, a)).float().cpu(), ref, x_max)
                for a in grid}
        best = min(grid, key=lambda a: (errs[a], a))
        chosen[t.key] = best
        errors[t.key] = {f"{a:g}": e for a, e in errs.items()}
        if best != 0.0:
            apply_scales_(model, t, smoothing_scales(amax, wmax, best))
    log.info("auto alpha: %s", dict(list(chosen.items())[:4]))
    return chosen, errors


def _ste(x: torch.Tensor) -> torch.Tensor:
    """`fq(x, dim=-1)` in the forward pass, identity in the backward pass (straight-through rounding)."""
    return x + (fq(x, dim=-1) - x).detach()


def token_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """||out_t - ref_t||^2 / ||ref_t||^2 per token (every dim but the last): `layer_error` sums it over a
    layer's output, `refine_scales` averages it over a group's output rows."""
    return (out - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp(min=1e-12)


def _stacked_weight(model, target: SmoothTarget) -> torch.Tensor:
    """The group's consuming linears' weights stacked, [sum of out, in], float32 on their device."""
    return torch.cat([linear_weight(model.get_submodule(n)).float() for n in target.linear_names])


@torch.no_grad()
def refine_scales(x: torch.Tensor, w: torch.Tensor, target: SmoothTarget, act: str = "token",
                  steps: int = REFINE_STEPS, live: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float]:
    """Per-channel scales r (s space) on top of a group's smoothing, fitted to its own simulated output.

    x [rows, in] is the consumers' (already smoothed) input, w [out, in] their stacked weights. The
    alpha formula ties every channel's scale to its maximum by one exponent; this frees each channel: log r
    is fitted by Adam on the mean of token_errors(fq_token(x / r) @ fq_channel(w * r)^T, x @ w^T) (act
    "none": x / r stays float), the rounding passed straight through. Exact in float, as any smoothing scale.
    The error is measured exactly every few steps and the best r kept; r stays within [1/REFINE_BOUND,
    REFINE_BOUND], and channels not in `live` (dead: calibration never saw them) stay 1. Returns (r, its error / the
    unrefined error), r None when nothing beat the start."""
    x, w = (t.float() for t in (x, w))
    x, w = (t.clone() if t.is_inference() else t for t in (x, w))  # calibration rows are: autograd needs copies
    ref = x @ w.t()
    den = ref.pow(2).sum(-1).clamp(min=1e-12)  # token_errors' denominator, per row
    rows = max(1, PIECE // w.shape[1])  # w's output rows per piece: bounded working memory

    def err(r: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """The mean token error; with `ste` (under enable_grad) its gradient is accumulated into r's leaf,
        one piece of w's rows at a time (the return value is then detached)."""
        ri = expand_to_inputs(target, r)
        q = _ste if ste else (lambda t: fq(t, dim=-1))
        xi = x / ri
        xq = xi if act == "none" else q(xi)
        if w.shape[0] <= rows:  # one piece
            e = token_errors(xq @ q(w * ri).t(), ref).mean()
            if ste:
                e.backward()
            return e
        xl = xq.detach().requires_grad_(ste)
        total = torch.zeros((), device=x.device)
        for lo in range(0, w.shape[0], rows):
            e = ((xl @ q(w[lo:lo + rows] * ri).t() - ref[:, lo:lo + rows]).pow(2).sum(-1) / den).mean()
            if ste:
                e.backward(retain_graph=True)  # the graph of ri (shared by the pieces) is kept; the piece's is not
            total += e.detach()
            del e
        if ste:
            xq.backward(xl.grad)
        return total

    start = float(err(torch.ones(target.channels, device=x.device)))
    if not start > 0:
        return None, 1.0
    u = torch.zeros(target.channels, device=x.device, requires_grad=True)
    mask = torch.ones_like(u) if live is None else live.float().to(x.device)
    opt = torch.optim.Adam([u], lr=REFINE_LR)
    best, best_err = None, start
    bound = math.log(REFINE_BOUND)
    for step in range(1, steps + 1):
        opt.zero_grad()
        with torch.enable_grad():
            err(u.exp(), ste=True)  # accumulates u.grad
        u.grad.mul_(mask)
        opt.step()
        u.clamp_(-bound, bound)
        if step % REFINE_CHECK == 0 or step == steps:
            e = float(err(u.exp()))
            if e < best_err:
                best, best_err = u.detach().exp().clone(), e
    return best, best_err / start


def layer_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Sum over tokens of ||out_t - ref_t||^2 / ||ref_t||^2: each token's error relative to its own hidden
    state, as the next layer's input norm sees it. A plain squared error would be decided by the few
    attention-sink tokens whose hidden states are ~1000x larger than the rest (SmolLM2: ~3000 vs ~5)."""
    return float(token_errors(out, ref).sum())


def resolve_refine(recipe, window_mean_rival: bool):
    """`recipe` (a llmq.config.Recipe, its statistic already concrete) with smoothing.refine "auto" made concrete:
    every smoothing group for a W8A8 `--alpha auto` build under the maximum statistic when the guard builds no
    window-mean rival (`--sequential`, `guard_windows: 0`, `statistic: max`), else none. Measured in
    docs/benchmarks.md: over the maximum, -6 to -19% KL on every text of SmolLM2 and Gemma 3 (Qwen2.5: within
    rebuild noise); beside the window mean, nothing reliable; 50-80% more time either way."""
    from dataclasses import replace

    sm = recipe.smoothing
    if sm.refine != "auto":
        return recipe
    if recipe.quantization.method != "smoothquant" or sm.alpha != "auto":
        return replace(recipe, smoothing=replace(sm, refine=()))  # nothing to refine
    on = recipe.calibration.statistic == "max" and not window_mean_rival
    log.info("smoothing.refine auto: %s", "per-channel scales for every group (statistic max, no window-mean rival)"
             if on else "off (a window-mean build, which does the same job)")
    return replace(recipe, smoothing=replace(sm, refine=tuple(sm.groups) if on else ()))


@torch.no_grad()
def search_layer_alpha_(feed, targets: Sequence[SmoothTarget], qnames: Sequence[str], stats: CalibrationStats,
                        grid: Sequence[float], windows: Sequence[int] = (0,), act: str = "token",
                        float_inputs: Collection[str] = frozenset(), refine: Collection[str] = (),
                        ) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, float]]:
    """Pick and apply, in place, one alpha per group of one decoder layer, scored by the error of the whole
    layer's output (attention with its norms, RoPE and q/k norms, and the MLP) under simulated bitsandbytes
    W8A8 (`act` "token"; "none": weight-only, inputs left float) on all the layer's linears `qnames`,
    against the float layer, on the cached inputs of `windows`. The linears in `float_inputs` (quantization.a16)
    are simulated weight-only whatever `act`, and their groups start from the weight-only per-group search.

    `feed` is llmq/layers.py's Feed (`output(w)` runs the layer on window w). Start: the better of alpha 0
    everywhere and the per-group search above; then one coordinate sweep, group by group, over the values of
    `grid` within SWEEP_RADIUS of the group's current alpha, and 0.
    A candidate whose smoothed weights, int8 inputs or outputs leave the float16 range (bitsandbytes
    quantizes through fp16; CUDA's int8_mm_dequant writes fp16) is dropped (error inf).
    Then the groups whose kind is in `refine` get per-channel scales on top (`refine_scales`, on their
    calibration rows), kept only if the layer's output error falls. Returns (alpha per key, error per alpha
    per key: the sweep's errors, refined key -> its group's error / the unrefined one)."""
    from .fakequant import SimMode, simulate_
    from .smooth import fits_fp16, smooth_target_

    layer = feed.layer[0]
    base = {k: v.clone() for k, v in layer.state_dict().items()}
    ref = [feed.output(w) for w in windows]
    keys = [t.key for t in targets]

    def smooth_all(alphas: dict[str, float], extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        layer.load_state_dict(base)
        applied = {t.key: smooth_target_(feed, t, stats.act_max, alphas[t.key]) for t in targets}
        for t in targets:
            if t.key in extra:
                apply_scales_(feed, t, extra[t.key])
        return applied

    def score(alphas: dict[str, float], extra: dict[str, torch.Tensor] | None = None) -> float:
        smooth_all(alphas, extra or {})
        w_max = max(float(linear_weight(feed.get_submodule(n)).abs().max()) for n in qnames)
        peak = [0.0, 0.0]  # int8 inputs, outputs

        def watch(module, args, out):
            peak[0], peak[1] = max(peak[0], float(args[0].abs().max())), max(peak[1], float(out.abs().max()))

        handles = simulate_(feed, SimMode(act, "channel"), [n for n in qnames if n not in float_inputs])
        handles += simulate_(feed, SimMode("none", "channel"), [n for n in qnames if n in float_inputs])
        handles += [feed.get_submodule(n).register_forward_hook(watch) for n in qnames]
        try:
            err = sum(layer_error(feed.output(w).float(), r.float()) for w, r in zip(windows, ref, strict=True))
        finally:
            for h in handles:
                h.remove()
        return err if fits_fp16(w_max, peak[0], peak[1]) and err == err else float("inf")

    a16 = [t for t in targets if set(t.linear_names) <= set(float_inputs)]
    start, _ = search_alpha_(feed, [t for t in targets if t not in a16], stats, grid, error=group_error(act),
                             progress=False)  # undone in score
    if a16:
        start.update(search_alpha_(feed, a16, stats, grid, error=group_error("none"), progress=False)[0])
    zero = dict.fromkeys(keys, 0.0)
    e_start, e_zero = score(start), score(zero)
    best, best_err = (dict(start), e_start) if e_start < e_zero else (zero, e_zero)
    errors: dict[str, dict[str, float]] = {}
    for t in targets:  # near the current value (and 0, no smoothing): 3x fewer layer passes than the grid
        errs = {best[t.key]: best_err}
        for a in grid:
            if a not in errs and (a == 0.0 or abs(a - best[t.key]) <= SWEEP_RADIUS + 1e-9):
                errs[a] = score({**best, t.key: a})
        a = min(errs, key=lambda x: (errs[x], x))
        best, best_err = {**best, t.key: a}, errs[a]
        errors[t.key] = {f"{x:g}": e for x, e in sorted(errs.items())}
    extra: dict[str, torch.Tensor] = {}
    ratios: dict[str, float] = {}
    chosen = [t for t in targets if t.group in refine and t not in a16] if act == "token" else []
    if chosen:  # W8A8 groups only: weight-only's refined were worse (docs/benchmarks.md); --a16's not measured
        applied = smooth_all(best, {})
        for t in chosen:
            s = applied[t.key]
            w = _stacked_weight(feed, t)  # on its device
            x = stats.samples[t.linear_names[0]].float().to(w.device)
            x = x if s is None else x / expand_to_inputs(t, s.float().to(w.device))
            r, ratios[t.key] = refine_scales(x, w, t, act, live=act_max(t, stats.act_max) > 0)
            if r is not None:
                extra[t.key] = r
        e_refined = score(best, extra) if extra else float("inf")
        log.debug("refined %d groups: layer error %.4g -> %.4g", len(extra), best_err, e_refined)
        if not e_refined < best_err:
            extra = {}
    smooth_all(best, extra)
    log.debug("layer alphas %s (error %.4g; alpha 0: %.4g)", best, best_err, e_zero)
    return best, errors, {k: ratios[k] for k in extra}
