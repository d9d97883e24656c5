"""Perplexity of an exported W8A8 folder under transformers + compressed-tensors, with the package's dynamic
activation scale (absmax/127.5, clamp [-128, 127]) or with the absmax/127 that bitsandbytes and vLLM's int8
kernels use (a monkeypatch, for this measurement only). docs/serving.md quotes both.

    python scripts/export_rounding.py DST {127.5,127} [--max-tokens 4096] [--seq-len 1024]
"""

import argparse
import json

from llmq.config import Evaluation
from llmq.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("denominator", choices=("127.5", "127"))
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=1024)
    a = ap.parse_args()
    import compressed_tensors.quantization.lifecycle.forward as fwd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.denominator == "127":
        stock = fwd.compute_dynamic_scales_and_zp

        def absmax_over_127(*args, **kw):
            scale, zero_point = stock(*args, **kw)
            return scale * (127.5 / 127.0), zero_point

        fwd.compute_dynamic_scales_and_zp = absmax_over_127
    model = AutoModelForCausalLM.from_pretrained(a.folder).eval()
    tok = AutoTokenizer.from_pretrained(a.folder)
    r = evaluate(model, tok, Evaluation(seq_len=a.seq_len, max_tokens=a.max_tokens), progress=False)
    print(json.dumps({"folder": a.folder, "activation_scale": f"absmax/{a.denominator}", "perplexity": r.perplexity,
                      "tokens": r.tokens}))


if __name__ == "__main__":
    main()
