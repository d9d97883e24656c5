"""CUDA-only checks (marker `gpu`; skipped without CUDA): what CPU tests cannot see because bitsandbytes'
CUDA kernels and float16 models behave differently there. scripts/gpu_check.sh runs them.

- W8A8 output overflow: on CUDA, bitsandbytes' int8_mm_dequant writes float16 whatever the input dtype, so
  a linear whose true output exceeds 65504 returns inf even in a float32 model (on CPU it computes in
  float32). llmq must refuse such a model at quantization time or produce finite, right outputs; never
  hand back a model that silently yields inf/nan.
- Gemma norms in float16: smoothing divides a Gemma norm's multiplier (1 + w) by s and stores
  w' = (1 + w) / s - 1 in the model's dtype. Near w' = -1 float16 has a spacing of 2^-11, so for large s
  the effective multiplier (1 + w') * s loses precision, or the channel is zeroed when (1 + w) / s < 2^-12.
"""

from __future__ import annotations

import copy

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


def _gemma():
    from transformers import AutoModelForCausalLM, GemmaConfig

    cfg = GemmaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("layernorm.weight"):
                p.normal_(0.0, 0.1)  # trained Gemma norms are not w = 0
    return m


@pytest.mark.parametrize("alpha", [0.5, 0.85])
@pytest.mark.parametrize("outlier", [30.0, 3000.0])  # on CPU in float16: 30 keeps 0.7%; 3000 loses 6 to 32%
def test_gemma_norm_smoothing_in_float16_keeps_each_channel(alpha: float, outlier: float) -> None:
    """Per channel, the smoothed float16 norm times s must equal the original (1 + w) to 1% (float16 itself
    keeps 0.05%); and the smoothed float16 model's logits must stay as close to float32's as before."""
    from llmq.smooth import act_max, smooth_, smooth_targets, smoothing_scales, weight_max

    fp32 = _gemma().cuda()
    m = copy.deepcopy(fp32).half()
    g = torch.Generator().manual_seed(1)
    acts = {}
    for t in smooth_targets(m, ("attn", "mlp")):
        for n in t.linear_names:
            a = torch.rand(m.get_submodule(n).weight.shape[1], generator=g) + 0.5
            a[:4] = outlier  # a few outlier channels, as trained LLMs have
            acts[n] = a
    targets = [t for t in smooth_targets(m, ("attn", "mlp")) if t.prev_kind == "gemma_norm"]
    assert targets
    before = {t.key: (m.get_submodule(t.prev_name).weight.detach().float().clone(),
                      smoothing_scales(act_max(t, acts), weight_max(m, t), alpha)) for t in targets}
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        ref = fp32(ids).logits.float()
        base_err = (m(ids).logits.float() - ref).abs().max().item()
    smooth_(m, acts, alpha, groups=("attn", "mlp"))
    worst = 0.0
    for t in targets:
        w0, s = before[t.key]
        w1 = m.get_submodule(t.prev_name).weight.detach().float()
        eff = (1.0 + w1) * s.to(w1.device)
        worst = max(worst, ((eff - (1.0 + w0)).abs() / (1.0 + w0).abs().clamp(min=1e-3)).max().item())
    with torch.no_grad():
        err = (m(ids).logits.float() - ref).abs().max().item()
    assert worst <= 1e-2, f"a float16 Gemma norm channel lost {worst:.1%} of its multiplier to smoothing"
    assert err <= 2 * base_err + 1e-3, f"smoothed float16 logits err {err:.2e} vs unsmoothed {base_err:.2e}"


def test_decode_speed_runs_on_cuda_int8() -> None:
    from llmq.quantize import quantize_
    from llmq.speed import Decode, compare_decode

    fp16 = tiny_llama().half().cuda()
    q = tiny_llama().half()
    quantize_(q, Quantization(method="smoothquant"), progress=False)
    q = q.cuda()
    ids = torch.randint(3, 256, (32,), generator=torch.Generator().manual_seed(0))
    res = compare_decode({"fp16": fp16, "w8a8": q}, ids, Decode(new_tokens=8, repeats=2, warmup=1))
    assert all(len(r.generated) == 8 and r.device.startswith("cuda") for r in res.values())
    assert res["w8a8"].peak_memory_kind == "cuda" and res["w8a8"].ratios["fp16"] > 0
