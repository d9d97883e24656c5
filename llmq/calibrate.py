"""Calibration: run token windows through the model and record, per input channel of the chosen linears,
the running abs-max of their inputs (forward pre-hooks; activations are never stored). Optionally keep a
small seeded sample of input rows per linear, which `--alpha auto` scores candidate alphas on.

The statistic (`calibration.statistic`): "max", the abs-max over every calibration token (SmoothQuant's), or
"window-mean", the mean over the windows of each window's abs-max. A maximum grows with the number of tokens it
sees, so more windows set the smoothing scales by rarer spikes; the window mean does not grow with the number of
windows (docs/benchmarks.md, "A smoothing statistic that does not grow with the sample"). "auto" (the default)
builds with the max, and the guard of --alpha auto (llmq/guard.py) also builds auto under the window mean and
ships whichever has the lower KL on held-out windows: which one is better depends on the model."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .errors import NumericalError

log = logging.getLogger(__name__)


@dataclass
class CalibrationStats:
    act_max: dict[str, torch.Tensor]  # linear name -> [in_features] float32 running abs-max
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # linear name -> [n, in_features] float32
    tokens: int = 0
    rotated: bool = False  # measured on a --rotate model (llmq/rotate.py): maxima of other channels
    statistic: str = "max"  # llmq.config.STATISTICS


_ROTATED = "llmq_rotated"  # act_scales.safetensors metadata key: "2" after --rotate (R1 + R2); absent or "0"
# otherwise; "1": an earlier llmq rotated the residual stream only, so its v_o maxima are in another basis
_STATISTIC = "llmq_statistic"  # metadata key: "max" or "window-mean"; absent: "max" (files before the option)


def resolve_statistic(recipe, scales: CalibrationStats | None):
    """`recipe` (a llmq.config.Recipe) with calibration.statistic "auto" made concrete for a build: the statistic
    of the --act-scales `scales`, else the max (the guard builds the window mean as a rival: llmq/guard.py)."""
    from dataclasses import replace

    cal = recipe.calibration
    if cal.statistic != "auto":
        return recipe
    return replace(recipe, calibration=replace(cal, statistic="max" if scales is None else scales.statistic))


def saved_stats(scales: CalibrationStats | None, res, statistic: str) -> CalibrationStats | None:
    """The act_scales.safetensors maxima: the --act-scales `scales` (which hold `statistic`), else the fresh
    ones of the stage's BlockResult `res`, or none."""
    if scales is not None:
        return scales
    return CalibrationStats(act_max=res.act_max, tokens=res.tokens, statistic=statistic) if res.act_max else None


def _device_of(model) -> torch.device:
    return next(p.device for p in model.parameters() if p.device.type != "meta")


@torch.inference_mode()
def calibrate(model, windows: torch.Tensor, names: list[str], *, sample_names: tuple[str, ...] = (),
              sample_tokens: int = 0, seed: int = 0, statistic: str = "max",
              progress: bool = True) -> CalibrationStats:
    """Record the per-channel abs-max of the inputs of the modules `names` over `windows` ([n, seq_len] token
    ids, or cached layer inputs), running over every token ("max") or averaged over windows ("window-mean").

    For the modules in `sample_names`, also keep `sample_tokens` input rows drawn uniformly (seeded) across
    the windows. Raises NumericalError naming the layer if an input holds inf/nan.
    """
    act_max: dict[str, torch.Tensor] = {}  # "window-mean": the running sum of per-window maxima
    seen: dict[str, int] = {}  # windows each module saw (one forward call per window)
    # one preallocated buffer per sampled module: many small per-window tensors fragment the heap (GBs)
    rows: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = dict.fromkeys(sample_names, 0)
    n_win = windows.shape[0]
    per_window = -(-sample_tokens // n_win) if sample_tokens else 0
    gen = torch.Generator().manual_seed(seed)
    picks: list[torch.Tensor] = []  # token positions sampled in the current window (shared by all layers)

    def hook(name: str):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            cur = x.abs().amax(dim=0).float()
            if not torch.isfinite(cur).all():
                raise NumericalError(f"non-finite activations (inf/nan) at the input of {name} during "
                                     "calibration; check the model's weights and dtype (try --dtype float32)")
            prev = act_max.get(name)
            if prev is None:
                act_max[name] = cur
            else:
                act_max[name] = prev + cur if statistic == "window-mean" else torch.maximum(prev, cur)
            seen[name] = seen.get(name, 0) + 1
            if name in filled and picks and filled[name] < sample_tokens:
                got = x[picks[0].to(x.device)].float().cpu()[: sample_tokens - filled[name]]
                buf = rows.get(name)
                if buf is None:
                    buf = rows[name] = torch.empty(sample_tokens, x.shape[-1])
                buf[filled[name]:filled[name] + got.shape[0]] = got
                filled[name] += got.shape[0]
        return fn

    log.info("calibrating %d linears on %d windows of %d tokens", len(names), n_win, windows.shape[1])
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = _device_of(model)
    # The LM head is never smoothed: run only the decoder body when every hooked module lives in it.
    prefix = getattr(model, "base_model_prefix", "")
    body = model.base_model if prefix and all(n.startswith(prefix + ".") for n in names) else model
    try:
        for i in tqdm(range(n_win), desc="calibrating", unit="window", disable=not progress):
            ids = windows[i:i + 1]
            picks.clear()
            if per_window:
                picks.append(torch.randperm(ids.shape[1], generator=gen)[:per_window].sort().values)
            body(ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(names) - set(act_max))
    if missing:
        raise NumericalError(f"calibration never reached {missing[:3]}...; the model's forward skips them")
    samples = {n: buf[:filled[n]] for n, buf in rows.items()}
    if statistic == "window-mean":
        act_max = {k: v / seen[k] for k, v in act_max.items()}
    log.info("calibrated %d linears on %d tokens", len(names), windows.numel())
    return CalibrationStats(act_max={k: v.cpu() for k, v in act_max.items()}, samples=samples,
                            tokens=int(windows.numel()), statistic=statistic)


def save_act_scales(stats: CalibrationStats, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in stats.act_max.items()}, str(path),
              metadata={_ROTATED: "2" if stats.rotated else "0", _STATISTIC: stats.statistic})


def load_act_scales(path, statistic: str | None = None) -> CalibrationStats:
    """The saved statistics; with `statistic`, a ConfigError unless the file holds that one."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--act-scales {str(p)!r} does not exist; pass the act_scales.safetensors of an "
                          "earlier llmq output")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        stats = CalibrationStats(act_max={k: v.float() for k, v in load_file(str(p)).items()},
                                 rotated=meta.get(_ROTATED) == "2", statistic=meta.get(_STATISTIC, "max"))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"--act-scales {str(p)!r} is not a readable safetensors file ({e}); pass the "
                          "act_scales.safetensors of an earlier llmq output") from None
    if meta.get(_ROTATED) == "1":
        raise ConfigError(f"--act-scales {str(p)!r} were measured by an earlier llmq whose --rotate left each "
                          "head's values unrotated, so o_proj's maxima are in another basis; recalibrate without "
                          "--act-scales")
    if statistic is not None and stats.statistic != statistic:
        raise ConfigError(f"--act-scales {str(p)!r} holds the {stats.statistic} statistic and this run asks for "
                          f"{statistic}; pass --set calibration.statistic={stats.statistic}, or recalibrate "
                          "without --act-scales")
    return stats
