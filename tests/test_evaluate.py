"""Perplexity protocol, fidelity metrics, memory accounting (llmq/evaluate.py, llmq/memory.py)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmq.errors import DataError, NumericalError
from llmq.evaluate import EvalResult, evaluate_ids, format_table
from llmq.memory import PeakMemory, weight_bytes

SMOL = Path("/tmp/proto/smol_fp")


class Uniform(torch.nn.Module):
    """Logits all zero (a uniform distribution): perplexity must equal the vocabulary size."""

    def __init__(self, vocab: int, value: float = 0.0) -> None:
        super().__init__()
        self.vocab, self.value = vocab, value
        self.calls: list[int] = []

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        self.calls.append(input_ids.shape[1])
        return SimpleNamespace(logits=torch.full((*input_ids.shape, self.vocab), self.value))


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def reference_ppl(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, bos_id: int | None = None) -> float:
    """Independent implementation: index loop + the HF `labels=` loss (mean, un-averaged by hand)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), seq_len):
            chunk = ids[start:start + seq_len].tolist()
            if len(chunk) < 2:
                continue
            labels = list(chunk)
            if bos_id is not None:
                chunk, labels = [bos_id, *chunk], [-100, *labels]
            n = sum(1 for t in labels[1:] if t != -100)
            out = model(torch.tensor([chunk]), labels=torch.tensor([labels]), use_cache=False)
            total += out.loss.double().item() * n
            count += n
    return math.exp(total / count)


@pytest.mark.parametrize("bos", [None, 3])
def test_uniform_logits_give_vocab_size(bos: int | None) -> None:
    ids = torch.randint(0, 50, (1000,))
    r = evaluate_ids(Uniform(50), ids, 128, bos_id=bos, progress=False)
    assert r.perplexity == pytest.approx(50.0, rel=1e-6)
    assert r.nll == pytest.approx(math.log(50), rel=1e-7)  # per-token log-softmax is float32
    assert r.bos is (bos is not None)
    assert isinstance(r, EvalResult) and r.to_dict()["perplexity"] == r.perplexity


@pytest.mark.parametrize("n,seq_len,max_tokens", [(1000, 128, None), (1024, 128, None), (1025, 128, None),
                                                    (1000, 128, 300), (10, 4, None)])
@pytest.mark.parametrize("bos", [None, 1])
def test_scored_token_count(n: int, seq_len: int, max_tokens: int | None, bos: int | None) -> None:
    model = Uniform(8)
    r = evaluate_ids(model, torch.randint(0, 8, (n,)), seq_len, bos_id=bos, max_tokens=max_tokens,
                     progress=False)
    kept = min(n, max_tokens or n)
    lengths = [min(seq_len, kept - s) for s in range(0, kept, seq_len)]
    lengths = [k for k in lengths if k >= 2]  # a 1-token remainder has nothing to score
    extra = 1 if bos is not None else 0
    assert r.windows == len(lengths)
    assert r.tokens == sum(k - 1 + extra for k in lengths)
    assert model.calls == [k + extra for k in lengths]  # the partial last window is run too
    assert r.seconds > 0 and r.tokens_per_second == pytest.approx(sum(model.calls) / r.seconds)
    assert f"{r.windows} non-overlapping windows of {seq_len}" in r.protocol
    assert f"{r.tokens} tokens scored" in r.protocol


def test_too_few_tokens() -> None:
    with pytest.raises(DataError, match="1 tokens"):
        evaluate_ids(Uniform(8), torch.tensor([3]), 16, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_raise(value: float) -> None:
    with pytest.raises(NumericalError, match="non-finite logits in window 0"):
        evaluate_ids(Uniform(8, value), torch.randint(0, 8, (40,)), 16, progress=False)


def test_non_finite_reference_raises() -> None:
    with pytest.raises(NumericalError, match="from the reference"):
        evaluate_ids(Uniform(8), torch.randint(0, 8, (40,)), 16, reference=Uniform(8, float("nan")),
                     progress=False)


@pytest.mark.parametrize("bos", [None, 1])
def test_matches_independent_implementation(bos: int | None) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 128, (700,), generator=torch.Generator().manual_seed(1))
    r = evaluate_ids(model, ids, 96, bos_id=bos, progress=False)
    assert r.perplexity == pytest.approx(reference_ppl(model, ids, 96, bos), rel=1e-6)
    assert 100 < r.perplexity < 200  # a random model is close to uniform over 128


def test_kl_and_top1_against_itself_and_a_perturbed_copy() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(2))
    same = evaluate_ids(model, ids, 64, reference=model, progress=False)
    assert same.kl_divergence == 0.0 and same.top1_agreement == 1.0

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diff = evaluate_ids(model, ids, 64, reference=other, progress=False)
    assert diff.kl_divergence > 1e-4 and diff.top1_agreement < 1.0
    assert diff.perplexity == same.perplexity  # the reference does not change the model's own score
    table = format_table({"fp32": same, "perturbed": diff})
    assert "perturbed" in table and f"{diff.perplexity:.4f}" in table and "top-1 agreement" in table


def test_weight_bytes_float_and_tied() -> None:
    model = tiny_llama()
    expected = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields a tied weight once
    expected += sum(b.numel() * b.element_size() for b in model.buffers())
    assert weight_bytes(model) == expected
    lin = torch.nn.Linear(10, 10)
    shared = torch.nn.ModuleList([lin, lin])
    assert weight_bytes(shared) == (100 + 10) * 4
    half = torch.nn.Linear(64, 32, bias=False).half()
    assert weight_bytes(half) == 64 * 32 * 2


def test_weight_bytes_int8_counts_scb_once() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    out_f, in_f = 96, 256
    lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False, threshold=0.0)
    lin.weight = bnb.nn.Int8Params(torch.randn(out_f, in_f), requires_grad=False, has_fp16_weights=False)
    lin = lin.to("cpu")  # quantizes: int8 weight + float32 row scales (SCB)
    assert lin.weight.dtype == torch.int8
    assert weight_bytes(lin) == out_f * in_f + out_f * 4
    lin(torch.randn(2, in_f))  # the first forward moves SCB from the weight to lin.state
    assert weight_bytes(lin) == out_f * in_f + out_f * 4
    fp = torch.nn.Linear(in_f, out_f, bias=False)
    assert weight_bytes(fp) / weight_bytes(lin) > 3.9


def test_peak_memory_cpu_sees_a_200mb_tensor() -> None:
    with PeakMemory("cpu") as mem:
        x = torch.ones(50 * 1024 * 1024)  # 200 MiB of float32, touched
        del x
    assert mem.kind == "cpu-rss" and mem.reserved_bytes is None
    assert mem.peak_bytes - mem.baseline_bytes >= 190 * 1024 * 1024
    with PeakMemory("cpu") as small:
        torch.ones(1024)
    if not small.peak_since_start:  # the reset worked, so the earlier 200 MiB must not show
        assert small.peak_bytes - small.baseline_bytes < 100 * 1024 * 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_cuda() -> None:
    with PeakMemory("cuda") as mem:
        x = torch.ones(50 * 1024 * 1024, device="cuda")
        del x
    assert mem.kind == "cuda" and mem.reserved_bytes >= mem.peak_bytes
    assert mem.peak_bytes - mem.baseline_bytes >= 200 * 1024 * 1024


def python_docs_text() -> str:
    """English prose shipped with every CPython: the pydoc topic pages."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.is_dir(), reason=f"needs the offline SmolLM2 at {SMOL}")
def test_real_model_matches_independent_implementation() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL)
    model = AutoModelForCausalLM.from_pretrained(SMOL, dtype=torch.float32).eval()
    ids = tok(python_docs_text(), add_special_tokens=False, return_tensors="pt").input_ids[0, :20480]
    assert ids.numel() == 20480
    r = evaluate_ids(model, ids, 1024, progress=False)
    assert r.windows == 20 and r.tokens == 20 * 1023
    assert r.perplexity == pytest.approx(reference_ppl(model, ids, 1024), rel=1e-3)
    assert 1.5 < r.perplexity < 50
    assert r.weight_memory_bytes == pytest.approx(134.5e6 * 4, rel=0.01)
