"""Memory planning: budgets, byte counts against real checkpoints, mode choice, evaluation under a budget."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from llmq.budget import main_device_key, parse_max_memory, parse_size
from llmq.config import Quantization
from llmq.errors import ConfigError
from llmq.plan import estimate, format_plan, should_run_sequential

FIXTURES = Path(__file__).parent / "fixtures" / "configs"
GiB = 2**30


def test_parse_max_memory():
    assert parse_max_memory("24GiB") == {main_device_key(): 24 * GiB}
    assert parse_max_memory("0=20GiB,1=20GiB,cpu=64GiB") == {0: 20 * GiB, 1: 20 * GiB, "cpu": 64 * GiB}
    assert parse_max_memory("cuda:1=512MiB, CPU = 2GB") == {1: 512 * 2**20, "cpu": 2 * 10**9}
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("1000") == 1000 and parse_size("7 MB") == 7 * 10**6


@pytest.mark.parametrize("spec", ["", "24XB", "GiB", "-1GiB", "gpu=3GiB", "0=", "0=1GiB,0=2GiB", "0:1GiB"])
def test_parse_max_memory_rejects(spec):
    with pytest.raises(ConfigError):
        parse_max_memory(spec)


def _saved_bytes(folder: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() * t.element_size() for f in folder.glob("*.safetensors") for t in load_file(str(f)).values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_byte_counts_match_saved_checkpoints(tmp_path, family):
    """FP and INT8 weight bytes equal what save_pretrained writes (INT8: within the 1-byte weight_format
    tag bitsandbytes stores per linear); gpt2 covers Conv1D (transposed) weights and tied embeddings."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from llmq.quantize import quantize_

    if family == "llama":
        model = tiny_llama(num_hidden_layers=3)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=256, n_embd=64, n_layer=3, n_head=4,
                                                            n_positions=128)).eval()
    plan = estimate(model.config, method="llm-int8", dtype="float32", calib_samples=4, calib_seq_len=32)
    assert plan.params == model.num_parameters() and plan.layers == 3
    model.save_pretrained(tmp_path / "fp")
    assert plan.fp_weight_bytes == _saved_bytes(tmp_path / "fp")
    layer0 = model.get_submodule("model.layers.0" if family == "llama" else "transformer.h.0")
    assert plan.largest_layer_bytes == sum(p.numel() * 4 for p in layer0.parameters())
    names = quantize_(model, Quantization(method="llm-int8"), progress=False)
    model.save_pretrained(tmp_path / "q")
    assert 0 <= _saved_bytes(tmp_path / "q") - plan.int8_weight_bytes <= len(names)


def test_budget_decides_the_mode():
    cfg = tiny_llama().config
    base = estimate(cfg, method="smoothquant", dtype="float32", calib_samples=8, calib_seq_len=64)
    assert base.budget_bytes is None and base.fits_in_memory and base.fits_sequential
    assert base.sequential_peak_bytes < base.in_memory_peak_bytes
    between = (base.sequential_peak_bytes + base.in_memory_peak_bytes) // 2
    mid = estimate(cfg, method="smoothquant", dtype="float32", calib_samples=8, calib_seq_len=64,
                   max_memory={"cpu": between})
    assert not mid.fits_in_memory and mid.fits_sequential and should_run_sequential(mid)
    assert "sequential (in-memory does not fit)" in format_plan(mid)
    small = estimate(cfg, method="smoothquant", dtype="float32", calib_samples=8, calib_seq_len=64,
                     max_memory={"cpu": base.sequential_peak_bytes // 2})
    assert not small.fits_sequential and not should_run_sequential(small)
    # no calibration without smoothing or GPTQ (weight-only alpha 0, round-to-nearest): no hidden states to hold
    w8 = estimate(cfg, method="weight-only", dtype="float32", calib_samples=8, calib_seq_len=64, alpha=0.0, gptq=False)
    assert w8.hidden_states_bytes == 0 and w8.sequential_peak_bytes < base.sequential_peak_bytes
    # GPTQ's Hessians come from every calibration window through the layers, whatever the method
    for method in ("weight-only", "llm-int8"):
        g = estimate(cfg, method=method, dtype="float32", calib_samples=8, calib_seq_len=64, alpha=0.0)
        assert g.hidden_states_bytes == base.hidden_states_bytes > 0
    # weight-only with auto scaling calibrates as smoothquant does
    w8_auto = estimate(cfg, method="weight-only", dtype="float32", calib_samples=8, calib_seq_len=64)
    assert w8_auto.hidden_states_bytes == base.hidden_states_bytes


def test_max_kl_counts_what_it_holds():
    """--max-kl holds a float copy of every int8 linear, the float reference and the reference's float32
    log-probabilities on the ranking windows."""
    model = tiny_llama(num_hidden_layers=3)
    cfg, vocab = model.config, model.config.vocab_size
    lin = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    kw = dict(method="smoothquant", dtype="float32", calib_samples=8, calib_seq_len=64)
    for alpha in (0.5, "auto"):
        base = estimate(cfg, alpha=alpha, **kw)
        kept = estimate(cfg, alpha=alpha, max_kl=0.01, rank_windows=3, **kw)
        want = lin * 4 + base.fp_weight_bytes + 3 * 64 * vocab * 4
        assert kept.in_memory_peak_bytes - base.in_memory_peak_bytes == want
        assert kept.sequential_peak_bytes == base.sequential_peak_bytes  # --max-kl runs in memory only


@pytest.mark.parametrize("name,params,inter,in_memory_fits,gptq_sequential_fits", [
    ("llama-3-8b", 8_030_261_248, 14336, True, True), ("llama-2-13b", 13_015_864_320, 13824, False, True),
    ("llama-3-70b", 70_553_706_496, 28672, False, True)])
def test_llama_configs_on_a_24gib_gpu(name, params, inter, in_memory_fits, gptq_sequential_fits):
    """docs/large-models.md's figures: published parameter counts, and what fits one 24 GiB GPU (a fixed alpha;
    auto's guard holds two int8 models beside the one it builds, so 8B no longer fits). GPTQ (the default)
    factors each down_proj's [inter, inter] Hessian in float64, in place: 70B's fits beside the rest."""
    budget = parse_max_memory("0=24GiB,cpu=64GiB")
    kw = dict(method="smoothquant", dtype="float16", calib_samples=32, calib_seq_len=512, max_memory=budget)
    plan = estimate(str(FIXTURES / name), alpha=0.5, **kw)
    auto = estimate(str(FIXTURES / name), alpha="auto", **kw)
    rtn = estimate(str(FIXTURES / name), alpha=0.5, gptq=False, **kw)
    assert not auto.fits_in_memory
    assert auto.in_memory_peak_bytes - plan.in_memory_peak_bytes == 2 * plan.int8_weight_bytes
    assert plan.params == params and plan.device == "cuda:0"
    assert plan.fp_weight_bytes == 2 * params
    assert 0.5 < plan.int8_weight_bytes / plan.fp_weight_bytes < 0.6  # embeddings and head stay 16-bit
    assert plan.fits_in_memory == in_memory_fits
    # GPTQ holds down_proj's float64 factor (8 bytes per entry) and then its float32 U at once
    assert plan.sequential_peak_bytes - rtn.sequential_peak_bytes >= 3 * inter**2 * 4
    assert plan.fits_sequential == gptq_sequential_fits
    assert rtn.fits_sequential and rtn.sequential_peak_bytes < 6 * GiB
    assert should_run_sequential(plan) == (not in_memory_fits and gptq_sequential_fits)
    # CPU memory of a sequential GPU run: the non-layer weights but the (untied) head while the inputs are
    # caught, or a layer in transit; the end of the run casts the non-layer tensors a piece at a time
    assert 0 < plan.head_bytes < plan.non_layer_bytes  # untied
    assert rtn.sequential_host_bytes == plan.sequential_host_bytes == max(
        plan.non_layer_bytes - plan.head_bytes, plan.largest_layer_bytes)


def test_plan_command(capsys):
    from llmq.cli import main

    assert main(["plan", str(FIXTURES / "llama-3-70b"), "--dtype", "float16", "--max-memory", "0=24GiB"]) == 0
    out = capsys.readouterr().out
    assert "70.55B params" in out and "131.42 GiB" in out and "sequential (in-memory does not fit)" in out
    assert "per-layer working set      15.47 GiB (GPTQ" in out  # down_proj's [28672, 28672] factorization
    args = ["plan", str(FIXTURES / "llama-3-70b"), "--dtype", "float16", "--max-memory", "0=16GiB"]
    assert main(args) == 0
    assert "neither fits the budget (--no-gptq needs less)" in capsys.readouterr().out
    assert main([*args, "--no-gptq"]) == 0
    assert "sequential (in-memory does not fit)" in capsys.readouterr().out


def test_evaluation_under_a_budget_smaller_than_the_model(tmp_path):
    """accelerate places what fits the budget on CPU and the rest on disk; perplexity is unchanged."""
    from llmq.evaluate import evaluate_ids
    from llmq.load import load

    model = tiny_llama(num_hidden_layers=4, hidden_size=128, intermediate_size=256)
    model.save_pretrained(tmp_path / "fp")
    tiny_tokenizer().save_pretrained(tmp_path / "fp")
    size = sum(p.numel() * 4 for p in model.parameters())
    ids = torch.randint(3, 256, (300,), generator=torch.Generator().manual_seed(0))
    full, _ = load(str(tmp_path / "fp"), device="cpu")
    ref = evaluate_ids(full, ids, 64, progress=False)
    budget = size // 2  # the embeddings (first) fit, the layers go to disk
    small, _ = load(str(tmp_path / "fp"), device="cpu", max_memory={"cpu": budget},
                    offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(small.hf_device_map.values())
    got = evaluate_ids(small, ids, 64, progress=False)
    assert got.weight_memory_bytes < budget < ref.weight_memory_bytes
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-6)


def test_sequential_needs_a_safetensors_checkpoint(tmp_path):
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    base = estimate(str(tmp_path), method="llm-int8", dtype="float32", calib_samples=4, calib_seq_len=32)
    between = (base.sequential_peak_bytes + base.in_memory_peak_bytes) // 2
    plan = estimate(str(tmp_path), method="llm-int8", dtype="float32", calib_samples=4, calib_seq_len=32,
                    max_memory={"cpu": between})
    assert not plan.sequential_supported and plan.fits_sequential and not should_run_sequential(plan)
    assert "from a safetensors checkpoint" in format_plan(plan)
