"""Probe: which linear type costs int8 the most? Fake-quantizes (float32, bitsandbytes' layout: per-token int8
activations for W8A8, per-row int8 weights; no smoothing, no GPTQ) one linear type at a time, then all of them,
and prints KL / top-1 against the float32 model on an offline text.

    python scripts/type_probe.py [--model llmq:smollm2] [--data llmq:kjv] [--max-tokens 2048] [--weight-only]

Each row is that type alone in int8, every other linear float: the rows do not add up to "all" exactly, but
they show where the error comes from (docs/benchmarks.md: down_proj, on every model measured).
"""

import argparse
import copy

import torch

from llmq.config import Evaluation
from llmq.evaluate import eval_ids, evaluate_ids
from llmq.fakequant import SimMode, simulate_
from llmq.load import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llmq:smollm2")
    ap.add_argument("--data", default="llmq:kjv")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--weight-only", action="store_true", help="int8 weights only, inputs left float (W8A16)")
    a = ap.parse_args()
    fp, tok = load(a.model, dtype="float32")
    ids, bos = eval_ids(tok, Evaluation(data=a.data, max_tokens=a.max_tokens, seq_len=512))
    linears = [n for n, x in fp.named_modules() if isinstance(x, torch.nn.Linear) and n != "lm_head"]
    types = sorted({n.rsplit(".", 1)[-1] for n in linears})
    mode = SimMode("none" if a.weight_only else "token", "channel")
    m = copy.deepcopy(fp)  # the working copy; fp stays the reference
    base = fp.state_dict()  # fp is never changed: each row restores m from it
    for t in [*types, "all"]:
        m.load_state_dict(base)
        handles = simulate_(m, mode, [n for n in linears if t == "all" or n.endswith("." + t)])
        with torch.no_grad():
            r = evaluate_ids(m, ids, 512, bos_id=bos, reference=fp, progress=False)
        for h in handles:
            h.remove()
        print(f"{a.model} {a.data} {r.tokens} tokens, {mode.name}, only {t:>10} in int8: KL {r.kl_divergence:.5f}, "
              f"top-1 {r.top1_agreement:.2%}", flush=True)


if __name__ == "__main__":
    main()
