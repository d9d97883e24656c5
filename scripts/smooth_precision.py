"""How exactly does smoothing survive 16-bit storage? p99 relative error of the per-channel multiplier.

For every norm-fed smoothing group of SmolLM2 (real norm weights, real calibration maxima on llmq:wiki), the
norm's multiplier m_j (plain norm: w_j; Gemma norm: 1 + w_j) is divided by s_j and stored in the dtype, and
the consumer columns are multiplied by the scale llmq applied. Smoothing is exact when
    stored multiplier (as the model computes it) * applied scale == original multiplier,
so this prints p99 and max over channels of |that ratio - 1|, and p99 of |applied / requested s - 1|.
The Gemma rows store the same multipliers m as w = m - 1, the way a Gemma checkpoint holds them. The
consumer weights' own rounding to 16 bits is per element, not per channel, and the same for every method;
it is not part of this number.

    python scripts/smooth_precision.py [--alpha 0.5] [--samples 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn


class _Pair(nn.Module):
    def __init__(self, w: torch.Tensor, out: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        self.lin = nn.Linear(w.numel(), out, bias=False, dtype=dtype)


def multiplier_errors(m: torch.Tensor, s: torch.Tensor, kind: str,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel of one norm: |stored multiplier * applied scale / original multiplier - 1|, and
    |applied scale / requested s - 1| (how far storage moved the smoothing itself)."""
    from llmq.smooth import SmoothTarget, apply_scales_

    one = 1.0 if kind == "gemma_norm" else 0.0
    pair = _Pair(m - one, 4, dtype)
    model_m = (lambda p: p.float() + one) if one else (lambda p: p)  # Gemma adds 1 in float32
    before = model_m(pair.norm.weight.detach()).double()  # the original multiplier as stored
    t = SmoothTarget("x", "attn", "norm", ("lin",), kind, m.numel())
    applied = apply_scales_(pair, t, s)
    applied = s if applied is None else applied  # llmq before 16-bit-exact smoothing returned nothing
    after = model_m(pair.norm.weight.detach()).double() * applied.double()
    live = before != 0
    return ((after[live] / before[live]) - 1).abs(), (applied.double() / s.double() - 1).abs()


def main() -> None:
    from llmq.calibrate import calibrate
    from llmq.config import Calibration
    from llmq.data import calibration_windows, load_text, tokenize
    from llmq.load import load
    from llmq.smooth import act_max, smooth_targets, smoothing_scales, weight_max

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args()
    model, tok = load("llmq:smollm2", dtype="float32", device="cpu")
    targets = [t for t in smooth_targets(model) if t.prev_kind == "norm"]
    ids = tokenize(tok, load_text(Calibration().source, "calibration"), 8 * args.samples * args.seq_len)
    windows = calibration_windows(ids, args.samples, args.seq_len, 0)
    stats = calibrate(model, windows, sorted({n for t in targets for n in t.linear_names}), progress=False)
    pairs = [(model.get_submodule(t.prev_name).weight.detach().float(),
              smoothing_scales(act_max(t, stats.act_max), weight_max(model, t), args.alpha)) for t in targets]
    print(f"SmolLM2 norms x {len(targets)} groups, alpha {args.alpha}, {windows.numel()} calibration tokens")
    print("| dtype | norm | p99 relative error | max relative error | p99 scale change |\n|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for kind in ("norm", "gemma_norm"):
            rows = [multiplier_errors(m, s, kind, dtype) for m, s in pairs]
            err, moved = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
            print(f"| {str(dtype)[6:]} | {'gemma (1+w)' if kind == 'gemma_norm' else 'plain w'} | "
                  f"{err.quantile(0.99).item():.2e} | {err.max().item():.2e} | {moved.quantile(0.99).item():.2e} |")


if __name__ == "__main__":
    main()
