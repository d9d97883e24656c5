"""Time one call of each int8 linear of a quantized folder at batch 1 (one decode step), against F.linear with
the same (dequantized) weights in bfloat16 and float32: where W8A8 decode time goes on this machine.

    python scripts/bench_linear_call.py FOLDER [--layer 3] [--calls 1000] [--threads N]

FOLDER is an llmq output folder (bitsandbytes int8), loaded with stock transformers. Prints a markdown table:
microseconds per call (median of 5 timed runs of --calls calls, after a warm-up), and the time bitsandbytes
spends in its int8 matmul alone (torch.ops.bitsandbytes.int8_linear_matmul on the quantized input).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch


def _us(f, calls: int) -> float:
    for _ in range(min(50, calls)):
        f()
    runs = []
    for _ in range(5):
        s = time.perf_counter()
        for _ in range(calls):
            f()
        runs.append((time.perf_counter() - s) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)  # the fp16-cast notice
    from transformers import AutoModelForCausalLM

    from llmq.gptq import dequantize

    model = AutoModelForCausalLM.from_pretrained(a.folder).eval()
    layer = model.model.layers[a.layer]
    rows = []
    for name, lin in layer.named_modules():
        if not hasattr(lin, "state"):  # not a bitsandbytes Linear8bitLt
            continue
        scb = lin.weight.SCB if getattr(lin.weight, "SCB", None) is not None else lin.state.SCB
        w32 = dequantize(lin.weight, scb)  # as bitsandbytes dequantizes
        x = torch.randn(1, 1, lin.in_features, dtype=torch.bfloat16)
        qa, _, _ = torch.ops.bitsandbytes.int8_vectorwise_quant(x.reshape(1, -1).half(), 0.0)
        wb, x32 = w32.bfloat16(), x.float()
        with torch.inference_mode():
            int8 = _us(lambda lin=lin, x=x: lin(x), a.calls)
            mm = _us(lambda lin=lin, qa=qa: torch.ops.bitsandbytes.int8_linear_matmul(qa, lin.weight), a.calls)
            bf16 = _us(lambda x=x, w=wb: torch.nn.functional.linear(x, w), a.calls)
            fp32 = _us(lambda x=x32, w=w32: torch.nn.functional.linear(x, w), a.calls)
        rows.append((name, f"{lin.in_features}->{lin.out_features}", int8, mm, bf16, fp32))
    print(f"{a.folder}, layer {a.layer}, {torch.get_num_threads()} threads, batch 1, one token")
    print("| linear | shape | Linear8bitLt call us | of which int8 matmul us | bf16 F.linear us | fp32 F.linear us |"
          " int8 / bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, shape, int8, mm, bf16, fp32 in rows:
        print(f"| {name} | {shape} | {int8:.0f} | {mm:.0f} | {bf16:.0f} | {fp32:.0f} | {int8 / bf16:.2f}x |")
    tot = [sum(r[i] for r in rows) for i in (2, 3, 4, 5)]
    print(f"| layer total | | {tot[0]:.0f} | {tot[1]:.0f} | {tot[2]:.0f} | {tot[3]:.0f} | {tot[0] / tot[2]:.2f}x |")


if __name__ == "__main__":
    main()
