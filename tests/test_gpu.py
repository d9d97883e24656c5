"""CUDA-only checks (marker `gpu`; skipped without CUDA): what CPU tests cannot see because bitsandbytes'
CUDA kernels and float16 models behave differently there. scripts/gpu_check.sh runs them.

- W8A8 output overflow: on CUDA, bitsandbytes' int8_mm_dequant writes float16 whatever the input dtype, so
  a linear whose true output exceeds 65504 returns inf even in a float32 model (on CPU it computes in
  float32). llmq must refuse such a model at quantization time or produce finite, right outputs; never
  hand back a model that silently yields inf/nan.
- Gemma norms in float16 on CUDA: tests/test_smooth.py::test_gemma_norm_smoothing_in_float16_whole_model runs
  on CPU and, marked gpu, on CUDA.
- Decode timing of a W8A8 model on CUDA. bitsandbytes quantizes on the device the model is on and keeps the
  int8 state beside the weight, where `Module.cuda()` / `.to()` do not move it: quantize on the GPU (as
  `llmq quantize` does with its default `device: auto`), or save and reload there; never move an int8 model.
- GPTQ's memory on CUDA: the in-place factorization and the sweep within what llmq/plan.py counts (the
  figure behind "Llama-3-70B with GPTQ fits a 24 GiB card", docs/large-models.md).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from llmq.config import Quantization
from llmq.errors import NumericalError

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FP16_MAX = 65504.0


def test_bnb_cuda_w8a8_dequant_writes_float16() -> None:
    """The kernel fact behind the next test: an exact output of 131072 from a float32 input comes back inf."""
    import bitsandbytes as bnb

    lin = torch.nn.Linear(256, 4, bias=False)
    with torch.no_grad():
        lin.weight.fill_(64.0)
    q = bnb.nn.Linear8bitLt(256, 4, bias=False, has_fp16_weights=False, threshold=0.0)
    q.weight = bnb.nn.Int8Params(lin.weight.data.half(), requires_grad=False, has_fp16_weights=False)
    q = q.cuda().eval()
    x = torch.full((2, 256), 8.0, device="cuda")  # |x| and |w| well inside float16
    with torch.no_grad():
        y = q(x)
    exact = 256 * 8.0 * 64.0
    assert exact > FP16_MAX and y.dtype == torch.float32
    # either bitsandbytes overflows (float16 dequant: inf) or it computes the right value; never a wrong finite one
    assert (not torch.isfinite(y).all()) or torch.allclose(y, torch.full_like(y, exact), rtol=1e-2)


def _overflowing_llama() -> tuple[torch.nn.Module, torch.Tensor]:
    """A float32 tiny llama on CUDA whose LAST down_proj outputs ~1.5e5 on `ids`, while its inputs and
    weights (and every other int8 input) stay inside float16: only the int8 OUTPUT leaves float16."""
    m = tiny_llama().cuda()
    ids = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    mlp = m.model.layers[-1].mlp
    seen = {}
    h = mlp.down_proj.register_forward_hook(lambda mod, a, out: seen.update(x=a[0].abs().max(), y=out.abs().max()))
    with torch.no_grad():
        mlp.up_proj.weight.mul_(100.0)
        m(ids, use_cache=False)
        mlp.down_proj.weight.mul_(1.5e5 / seen["y"])
        ref = m(ids, use_cache=False).logits
    h.remove()
    assert seen["x"] < FP16_MAX < seen["y"] and mlp.down_proj.weight.abs().max() < FP16_MAX
    assert torch.isfinite(ref).all()  # float32 holds it
    return m, ids


def test_w8a8_output_beyond_float16_is_refused_or_right() -> None:
    from llmq.quantize import check_fp16_range, quantize_

    m, ids = _overflowing_llama()
    quantize_(m, Quantization(method="smoothquant"), progress=False)
    try:
        check_fp16_range(m, ids)  # what llmq quantize runs after converting
    except NumericalError as e:
        assert "down_proj" in str(e) or "layers.1" in str(e), str(e)
        return
    with torch.no_grad():
        out = m(ids, use_cache=False).logits
    assert torch.isfinite(out).all(), ("W8A8 on CUDA overflowed float16 in int8_mm_dequant and llmq's "
                                       "float16-range check let the model through")


def test_evaluate_reports_overflow_as_a_numerical_error() -> None:
    """Whatever quantization lets through, the evaluator must never print an inf/nan perplexity."""
    from llmq.evaluate import evaluate_ids
    from llmq.quantize import quantize_

    m, ids = _overflowing_llama()
    quantize_(m, Quantization(method="smoothquant"), progress=False)
    try:
        r = evaluate_ids(m, ids[0], 64, progress=False)
    except NumericalError:
        return
    assert torch.isfinite(torch.tensor(r.perplexity))


def test_decode_speed_runs_on_cuda_int8() -> None:
    from llmq.quantize import quantize_
    from llmq.speed import Decode, compare_decode

    fp16 = tiny_llama().half().cuda()
    q = tiny_llama().half().cuda()  # quantized where it runs: bitsandbytes' int8 state does not follow .cuda()
    quantize_(q, Quantization(method="smoothquant"), progress=False)
    ids = torch.randint(3, 256, (32,), generator=torch.Generator().manual_seed(0))
    res = compare_decode({"fp16": fp16, "w8a8": q}, ids, Decode(new_tokens=8, repeats=2, warmup=1))
    assert all(len(r.generated) == 8 and r.device.startswith("cuda") for r in res.values())
    assert res["w8a8"].peak_memory_kind == "cuda" and res["w8a8"].ratios["fp16"] > 0


def test_gptq_cuda_memory_is_what_the_plan_counts() -> None:
    """On CUDA (the allocator's own counts, no resident-set noise): GPTQ's factorization holds one float64
    [in, in] matrix and U (3 x in^2 x 4 bytes) and quantize_weight stays within `working_bytes`, the figure
    llmq/plan.py uses to say a 70B model's GPTQ fits a 24 GiB card; U as on CPU."""
    from llmq.factor import inverse_cholesky
    from llmq.gptq import STAGE_CLIP_GRID, quantize_weight, working_bytes

    g = torch.Generator().manual_seed(0)
    n, out = 8192, 2048
    X = torch.randn(n + 64, n, generator=g)
    H, W = (X.T @ X).cuda(), torch.randn(out, n, generator=g).cuda()
    del X
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    U = inverse_cholesky(H, 0.01)
    factor = torch.cuda.max_memory_allocated() - base
    assert factor <= 3.2 * n * n * 4, factor / (n * n * 4)
    Ucpu = inverse_cholesky(H.cpu(), 0.01)
    assert ((U.cpu() - Ucpu).abs().max() / Ucpu.abs().max()) < 1e-4
    del U
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    CB, SCB = quantize_weight(W, H, clip_grid=STAGE_CLIP_GRID)
    assert torch.cuda.max_memory_allocated() - base <= working_bytes(out, n)
    assert CB.dtype == torch.int8 and CB.is_cuda and torch.isfinite(SCB).all()
