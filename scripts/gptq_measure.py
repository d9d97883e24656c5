"""GPTQ vs round-to-nearest int8 on the offline SmolLM2 (issue 11 item 3): perplexity and KL vs FP.

Layer by layer on the in-memory model, each layer's linears replaced by int8 modules built from GPTQ's
CB/SCB. Hessians from one FP forward over the calibration windows, or with --sequential from forwards
through the layers already quantized, each window's first position weighted as llmq weighs it
(`quantization.gptq_sink`; `--no-sink`: every position alike, as before 2026-12-07). RTN = bitsandbytes' own
conversion (`quantize_`).

    python scripts/gptq_measure.py --methods weight-only smoothquant --samples 8 --eval-tokens 4096
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import torch

from llmq.arch import get_arch
from llmq.config import Calibration, Evaluation, Quantization, Recipe, Smoothing
from llmq.data import calibration_set
from llmq.evaluate import evaluate
from llmq.gptq import Hessians, dequantize, hessian_error, quantize_weight, rtn_weight
from llmq.load import load
from llmq.quantize import bnb_quantization_config, int8_linear, linear_names, quantize_
from llmq.smooth import smooth_targets

log = logging.getLogger("gptq_measure")


class _Stop(Exception):
    pass


def _stop(module, args, output):
    raise _Stop


def _hessians(model, names: list[str], shared: dict, windows: torch.Tensor, stop_after=None,
              sink: bool = True) -> Hessians:
    handle = stop_after.register_forward_hook(_stop) if stop_after is not None else None
    try:
        with Hessians({n: model.get_submodule(n) for n in names}, shared, sink=sink) as hs:
            for w in windows:
                try:
                    model.base_model(w[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        if handle is not None:
            handle.remove()
    return hs


@torch.no_grad()
def gptq_(model, cfg: Quantization, windows: torch.Tensor, clip_grid: tuple[float, ...], sequential: bool) -> dict:
    """Quantize `model` in place, layer by layer, with GPTQ; returns calibration-metric summaries.

    sequential: layer i's Hessians come from inputs through the already-quantized layers 0..i-1 (one forward
    per layer); else from the FP model, all layers in one forward."""
    path = get_arch(model.config.model_type).layers
    shared = {n: t.key for t in smooth_targets(model) for n in t.linear_names}  # q/k/v, gate/up share X
    names = linear_names(model, cfg.skip)
    hs = None if sequential else _hessians(model, names, shared, windows, sink=cfg.gptq_sink)
    ratios, factors = [], []
    for i, layer in enumerate(model.get_submodule(path)):
        mine = [n for n in names if n.startswith(f"{path}.{i}.")]
        if sequential:
            hs = _hessians(model, mine, shared, windows, stop_after=layer, sink=cfg.gptq_sink)
        for n in mine:
            parent, _, child = n.rpartition(".")
            old = model.get_submodule(n)
            H = hs[n]
            CB, SCB = quantize_weight(old.weight, H, clip_grid=clip_grid)
            W = old.weight.float()
            g = hessian_error(W, dequantize(CB, SCB), H).sum()
            r = hessian_error(W, dequantize(*rtn_weight(W)), H).sum()
            ratios.append(float(g / r))
            factors += (SCB / W.abs().amax(1)).tolist()
            setattr(model.get_submodule(parent), child,
                    int8_linear(CB, SCB, old.bias, cfg.effective_threshold, training=old.training))
        log.info("layer %d: GPTQ/RTN calibration error %.3f (mean of %d)", i,
                 sum(ratios[-len(mine):]) / len(mine), len(mine))
    model.config.quantization_config = bnb_quantization_config(cfg, model)
    model.is_loaded_in_8bit = True
    f = torch.tensor(factors)
    return {"gptq_over_rtn_calib_error_mean": sum(ratios) / len(ratios),
            "gptq_over_rtn_calib_error_max": max(ratios),
            "clip_factor_share_below_1": float((f < 0.999).float().mean()), "clip_factor_min": float(f.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["weight-only", "smoothquant"])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--clip-grid", type=float, nargs="+", default=None, help="default: llmq.gptq.CLIP_GRID")
    ap.add_argument("--sequential", action="store_true", help="Hessians from already-quantized earlier layers")
    ap.add_argument("--no-sink", action="store_true",
                    help="every position alike in H (quantization.gptq_sink false)")
    ap.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest baselines")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)  # shared 2-core machine: more threads only spin
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("llmq").setLevel(logging.WARNING)
    from llmq.gptq import CLIP_GRID

    grid = tuple(a.clip_grid) if a.clip_grid else CLIP_GRID
    fp, tok = load("llmq:smollm2", dtype="float32", device="cpu")
    recipe = Recipe(calibration=Calibration(samples=a.samples, seq_len=a.seq_len), smoothing=Smoothing(alpha=0.0))
    windows = calibration_set(tok, recipe.calibration)
    ev = Evaluation(seq_len=a.eval_seq_len, max_tokens=a.eval_tokens)
    results = {"fp": evaluate(fp, tok, ev, progress=False).to_dict()}
    for method in a.methods:
        cfg = Quantization(method=method, gptq_sink=not a.no_sink)  # smoothquant at alpha 0: plain W8A8
        for algo in ("gptq",) if a.no_rtn else ("rtn", "gptq"):
            m = copy.deepcopy(fp)
            t0 = time.perf_counter()
            extra = {}
            if algo == "rtn":
                quantize_(m, cfg, progress=False)
            else:
                extra = gptq_(m, cfg, windows, grid, a.sequential)
            extra["quantize_seconds"] = round(time.perf_counter() - t0, 1)
            r = evaluate(m, tok, ev, reference=fp, reference_name="fp", progress=False)
            results[f"{method}/{algo}"] = {**extra, "perplexity": r.perplexity, "kl": r.kl_divergence,
                                           "top1": r.top1_agreement}
            log.info("%s/%s: %s", method, algo, json.dumps(results[f"{method}/{algo}"]))
            del m
    log.info("fp perplexity %.4f on %d tokens", results["fp"]["perplexity"], results["fp"]["tokens"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "clip_grid": grid, **results}, f, indent=1)


if __name__ == "__main__":
    main()
