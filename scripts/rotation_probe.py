"""Probe: does a Hadamard rotation of down_proj's input help W8A8? Fake-quantizes (float32, bitsandbytes'
W8A8: per-token int8 activations, per-row int8 weights, no smoothing) the linears of an offline model, with and
without an online block-Hadamard rotation of every down_proj input (x -> x H, W -> W H, H orthonormal, so the
float model is unchanged), and prints KL / top-1 / perplexity against the float32 model.

    python scripts/rotation_probe.py [--model llmq:smollm2] [--data llmq:kjv] [--block 128] [--only-down]

A probe, not a feature: a stock bitsandbytes checkpoint cannot run an online rotation (the residual-stream one,
which folds into the weights, is `llmq quantize --rotate`: llmq/rotate.py).
"""

import argparse

import torch

from llmq.config import Evaluation
from llmq.evaluate import eval_ids, evaluate_ids
from llmq.fakequant import SimMode, simulate_
from llmq.hadamard import hadamard
from llmq.load import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llmq:smollm2")
    ap.add_argument("--data", default="llmq:kjv")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128, help="Hadamard block (a power of 2 dividing the width)")
    ap.add_argument("--only-down", action="store_true", help="fake-quantize down_proj only (others float)")
    a = ap.parse_args()
    fp, tok = load(a.model, dtype="float32")
    ids, bos = eval_ids(tok, Evaluation(data=a.data, max_tokens=a.max_tokens, seq_len=1024))
    for rotate in (False, True):
        m, _ = load(a.model, dtype="float32")
        names = [n for n, x in m.named_modules() if isinstance(x, torch.nn.Linear) and n != "lm_head"
                 and (not a.only_down or n.endswith("down_proj"))]
        with torch.no_grad():
            for n in (n for n in names if rotate and n.endswith("down_proj")):
                lin = m.get_submodule(n)
                h = torch.block_diag(*[hadamard(a.block) / a.block**0.5] * (lin.in_features // a.block))
                lin.weight.copy_((lin.weight.double() @ h).float())
                hf = h.float()
                lin.register_forward_pre_hook(lambda mod, args, hf=hf: (args[0] @ hf, *args[1:]))
            simulate_(m, SimMode("token", "channel"), names)  # pre-hooks run in order: rotate, then quantize
            r = evaluate_ids(m, ids, 1024, bos_id=bos, reference=fp, progress=False)
        print(f"{a.model} {a.data} {r.tokens} tokens, {'down_proj only' if a.only_down else 'all linears'}, "
              f"rotation {'block ' + str(a.block) if rotate else 'none'}: KL {r.kl_divergence:.5f}, "
              f"top-1 {r.top1_agreement:.2%}, perplexity {r.perplexity:.4f}", flush=True)


if __name__ == "__main__":
    main()
