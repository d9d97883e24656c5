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
from collections.abc import Callable, Collection, Sequence

import torch
from tqdm.auto import tqdm

from .calibrate import CalibrationStats
from .errors import ConfigError
from .fakequant import fq
from .smooth import SmoothTarget, act_max, apply_scales_, expand_to_inputs, linear_weight, smoothing_scales, weight_max

log = logging.getLogger(__name__)
SWEEP_RADIUS = 0.2  # the layer-output sweep tries grid values this close to a group's start (and 0)

# err(x, w, s_in, ref, x_max): x [rows, in], w [out, in] (the group's linears stacked), s_in [in] input-space
# scales, ref = x @ w.T, x_max [in] calibrated abs-max of the unsmoothed input -> squared error
ErrorFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], float]


def w8a8_error(x: torch.Tensor, w: torch.Tensor, s_in: torch.Tensor, ref: torch.Tensor,
               x_max: torch.Tensor | None = None) -> float:
    """Squared error of bitsandbytes' W8A8 (per-token activations, per-row weights) after smoothing by s_in."""
    y = fq(x / s_in, dim=-1) @ fq(w * s_in, dim=-1).t()
    return float((y - ref).pow(2).sum())


def weight_only_error(x: torch.Tensor, w: torch.Tensor, s_in: torch.Tensor, ref: torch.Tensor,
                      x_max: torch.Tensor | None = None) -> float:
    """Squared error of int8 per-row weights (W8A16: the input stays float) after rescaling by s_in."""
    y = (x / s_in) @ fq(w * s_in, dim=-1).t()
    return float((y - ref).pow(2).sum())


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
        w = torch.cat([linear_weight(model.get_submodule(n)).float().cpu() for n in t.linear_names])
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


def layer_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Sum over tokens of ||out_t - ref_t||^2 / ||ref_t||^2: each token's error relative to its own hidden
    state, as the next layer's input norm sees it. A plain squared error would be decided by the few
    attention-sink tokens whose hidden states are ~1000x larger than the rest (SmolLM2: ~3000 vs ~5)."""
    return float(((out - ref).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp(min=1e-12)).sum())


@torch.no_grad()
def search_layer_alpha_(feed, targets: Sequence[SmoothTarget], qnames: Sequence[str], stats: CalibrationStats,
                        grid: Sequence[float], windows: Sequence[int] = (0,), act: str = "token",
                        float_inputs: Collection[str] = frozenset(),
                        ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Pick and apply, in place, one alpha per group of one decoder layer, scored by the error of the whole
    layer's output (attention with its norms, RoPE and q/k norms, and the MLP) under simulated bitsandbytes
    W8A8 (`act` "token"; "none": weight-only, inputs left float) on all the layer's linears `qnames`,
    against the float layer, on the cached inputs of `windows`. The linears in `float_inputs` (quantization.a16)
    are simulated weight-only whatever `act`, and their groups start from the weight-only per-group search.

    `feed` is llmq/layers.py's Feed (`output(w)` runs the layer on window w). Start: the better of alpha 0
    everywhere and the per-group search above; then one coordinate sweep, group by group, over the values of
    `grid` within SWEEP_RADIUS of the group's current alpha, and 0.
    A candidate whose smoothed weights, int8 inputs or outputs leave the float16 range (bitsandbytes
    quantizes through fp16; CUDA's int8_mm_dequant writes fp16) is dropped (error inf). Returns (alpha per
    key, error per alpha per key: the sweep's errors)."""
    from .fakequant import SimMode, simulate_
    from .smooth import fits_fp16, smooth_target_

    layer = feed.layer[0]
    base = {k: v.clone() for k, v in layer.state_dict().items()}
    ref = [feed.output(w) for w in windows]
    keys = [t.key for t in targets]

    def score(alphas: dict[str, float]) -> float:
        layer.load_state_dict(base)
        for t in targets:
            smooth_target_(feed, t, stats.act_max, alphas[t.key])
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
    layer.load_state_dict(base)
    for t in targets:
        smooth_target_(feed, t, stats.act_max, best[t.key])
    log.debug("layer alphas %s (error %.4g; alpha 0: %.4g)", best, best_err, e_zero)
    return best, errors
