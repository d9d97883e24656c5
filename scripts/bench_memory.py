"""Peak memory of quantizing SmolLM2: sequential (layer by layer) vs in-memory, each in its own process.

    python scripts/bench_memory.py [--model llmq:smollm2] [--alpha 0.5] [--calib-samples 32] [--json out.json]

Each mode runs in a fresh subprocess so the peaks never mix. There, after every import (torch,
transformers, bitsandbytes, llmq), the process's resident set is the baseline; the peak is the high-water
mark (VmHWM, reset at the start through /proc/self/clear_refs, see llmq/memory.py) over the whole run:
loading, calibration, smoothing, conversion and writing the output folder. Reported: peak - baseline,
next to the FP32 weight bytes and the estimates of llmq/plan.py. Target: sequential <= 0.5x FP32 weights.
The two output folders are then compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20
WORKER = r"""
import json, sys, time
import bitsandbytes, torch, transformers  # noqa: F401  (imports are part of the baseline)
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
import llmq.data, llmq.run, llmq.sequential, llmq.calibrate, llmq.alpha  # noqa: F401
from llmq.config import Recipe
from llmq.memory import PeakMemory
mode, out, recipe = sys.argv[1], sys.argv[2], Recipe.from_dict(json.loads(sys.argv[3]))
t0 = time.perf_counter()
with PeakMemory("cpu") as pm:
    if mode == "sequential":
        llmq.sequential.run_sequential(recipe, out, progress=False)
    else:
        llmq.run(recipe, out, progress=False)
print(json.dumps({"mode": mode, "peak_bytes": pm.peak_bytes, "baseline_bytes": pm.baseline_bytes,
                  "above_baseline_bytes": pm.above_baseline_bytes, "peak_since_start": pm.peak_since_start,
                  "seconds": round(time.perf_counter() - t0, 1)}))
"""


def _run(mode: str, out: Path, recipe_json: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", WORKER, mode, str(out), recipe_json], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("model*.safetensors")):
            out.update(load_file(str(f)))
        return out

    x, y = tensors(a), tensors(b)
    return sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llmq:smollm2")
    ap.add_argument("--method", default="smoothquant")
    ap.add_argument("--alpha", default="0.5", help="a number or auto (auto is several times slower on CPU)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--json", dest="json_path", default=None)
    a = ap.parse_args()

    from llmq.config import Recipe
    from llmq.plan import estimate

    alpha = a.alpha if a.alpha == "auto" else float(a.alpha)
    recipe = Recipe(model=a.model, dtype="float32", device="cpu").override(
        {"quantization.method": a.method, "smoothing.alpha": alpha, "calibration.samples": a.calib_samples,
         "calibration.seq_len": a.calib_seq_len})
    plan = estimate(a.model, method=a.method, dtype="float32", calib_samples=a.calib_samples,
                    calib_seq_len=a.calib_seq_len, max_memory={"cpu": 2**40}, alpha=alpha)
    fp32 = plan.fp_weight_bytes
    estimates = {"in-memory": plan.in_memory_peak_bytes, "sequential": plan.sequential_peak_bytes}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("in-memory", "sequential"):
            runs[mode] = _run(mode, Path(tmp) / mode, json.dumps(recipe.to_dict()))
        same = _same_tensors(Path(tmp) / "in-memory", Path(tmp) / "sequential")

    print(f"{a.model}: {a.method} alpha {a.alpha}, calibration {a.calib_samples} x {a.calib_seq_len}, float32, CPU; "
          f"FP32 weights {fp32 / MB:.1f} MB")
    print(f"{'mode':<12}{'peak - baseline MB':>20}{'x FP32 weights':>16}{'estimate MB':>13}{'seconds':>9}")
    for mode, r in runs.items():
        r["ratio_to_fp32_weights"] = r["above_baseline_bytes"] / fp32
        print(f"{mode:<12}{r['above_baseline_bytes'] / MB:>20.1f}{r['ratio_to_fp32_weights']:>16.2f}"
              f"{estimates[mode] / MB:>13.1f}{r['seconds']:>9.1f}")
    ratio = runs["sequential"]["above_baseline_bytes"] / max(runs["in-memory"]["above_baseline_bytes"], 1)
    meets = runs["sequential"]["ratio_to_fp32_weights"] <= 0.5
    print(f"sequential / in-memory: {ratio:.2f}; target sequential <= 0.5x FP32 weights: "
          f"{'met' if meets else 'NOT met'}; identical int8 checkpoints: {'yes' if same else 'NO'}")
    if a.json_path:
        data = {"model": a.model, "method": a.method, "alpha": a.alpha, "calib_samples": a.calib_samples,
                "calib_seq_len": a.calib_seq_len, "fp32_weight_bytes": fp32, "estimates_bytes": estimates,
                "runs": runs, "sequential_over_in_memory": ratio, "target_met": meets, "identical_outputs": same,
                "measure": "process RSS high-water mark minus RSS after imports, one subprocess per mode"}
        Path(a.json_path).write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
