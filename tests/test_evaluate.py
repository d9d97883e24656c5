"""Perplexity protocol, fidelity metrics, memory accounting (llmq/evaluate.py, llmq/memory.py)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama, tiny_text, tiny_tokenizer

from llmq.config import Evaluation
from llmq.errors import ConfigError, DataError, NumericalError
from llmq.evaluate import EvalResult, evaluate, evaluate_ids, format_table
from llmq.memory import PeakMemory, weight_bytes


class Uniform(torch.nn.Module):
    """Logits all zero (a uniform distribution): perplexity must equal the vocabulary size."""

    def __init__(self, vocab: int, value: float = 0.0) -> None:
        super().__init__()
        self.vocab, self.value = vocab, value
        self.calls: list[int] = []

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        self.calls.append(input_ids.shape[1])
        return SimpleNamespace(logits=torch.full((*input_ids.shape, self.vocab), self.value))


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
    assert isinstance(r, EvalResult) and EvalResult(**r.to_dict()) == r  # the CLI rebuilds it from JSON


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
    with pytest.raises(DataError, match="at least 2 tokens"):
        evaluate_ids(Uniform(8), torch.tensor([3]), 16, progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("with_reference", [False, True])
def test_non_finite_logits_raise(value: float, with_reference: bool) -> None:
    ref = Uniform(8) if with_reference else None
    with pytest.raises(NumericalError, match="non-finite logits in window 0"):
        evaluate_ids(Uniform(8, value), torch.randint(0, 8, (40,)), 16, reference=ref, progress=False)


class NanInRow(Uniform):
    """Finite logits except one nan in one row of the third window."""

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> SimpleNamespace:
        out = super().forward(input_ids)
        if len(self.calls) == 3:
            out.logits[0, 5, 7] = float("nan")
        return out


def test_a_single_nan_is_caught_with_its_window() -> None:
    with pytest.raises(NumericalError, match="non-finite logits in window 2"):
        evaluate_ids(NanInRow(8), torch.randint(0, 8, (64,)), 16, progress=False)


def test_non_finite_reference_raises() -> None:
    with pytest.raises(NumericalError, match="from the reference"):
        evaluate_ids(Uniform(8), torch.randint(0, 8, (40,)), 16, reference=Uniform(8, float("nan")),
                     progress=False)


@pytest.mark.parametrize("bos", [None, 1])
def test_matches_independent_implementation(bos: int | None) -> None:
    model = tiny_llama()
    ids = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(1))
    r = evaluate_ids(model, ids, 96, bos_id=bos, progress=False)
    assert r.perplexity == pytest.approx(reference_ppl(model, ids, 96, bos), rel=1e-6)
    assert 200 < r.perplexity < 400  # a random model is close to uniform over 256


def test_kl_and_top1_against_itself_and_a_perturbed_copy() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2))
    same = evaluate_ids(model, ids, 64, reference=model, progress=False)
    assert same.kl_divergence == 0.0 and same.top1_agreement == 1.0

    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diff = evaluate_ids(model, ids, 64, reference=other, progress=False)
    assert diff.kl_divergence > 1e-4 and diff.top1_agreement < 1.0
    alone = evaluate_ids(model, ids, 64, progress=False)
    assert diff.perplexity == same.perplexity == pytest.approx(alone.perplexity, rel=1e-12)
    table = format_table({"fp32": same, "perturbed": diff})
    assert "perturbed" in table and f"{diff.perplexity:.4f}" in table and "top-1 agreement" in table


def test_weight_bytes_float_and_tied() -> None:
    untied, tied = tiny_llama(), tiny_llama(tie_word_embeddings=True)
    for model in (untied, tied):
        expected = sum(p.numel() * 4 for p in model.parameters())  # parameters() yields a tied weight once
        expected += sum(b.numel() * b.element_size() for b in model.buffers())
        assert weight_bytes(model) == expected
    assert weight_bytes(untied) - weight_bytes(tied) == 256 * 64 * 4
    lin = torch.nn.Linear(10, 10)
    shared = torch.nn.ModuleList([lin, lin])
    assert weight_bytes(shared) == (100 + 10) * 4
    half = torch.nn.Linear(64, 32, bias=False).half()
    assert weight_bytes(half) == 64 * 32 * 2


@pytest.mark.parametrize("bos", [False, True])
def test_evaluate_from_a_text_file(tmp_path: Path, bos: bool) -> None:
    path = tmp_path / "eval.txt"
    path.write_text(tiny_text(600), encoding="utf-8")  # one token per word
    model, tok = tiny_llama(), tiny_tokenizer()
    cfg = Evaluation(data=str(path), seq_len=128, max_tokens=500, bos=bos)
    r = evaluate(model, tok, cfg, reference=model, reference_name="self", progress=False)
    ids = tok(path.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0, :500]
    assert r.tokens == 500 - 4 + (4 if bos else 0) and r.windows == 4 and r.data == str(path)
    assert r.perplexity == pytest.approx(reference_ppl(model, ids, 128, tok.bos_token_id if bos else None),
                                         rel=1e-6)
    assert r.reference == "self" and r.kl_divergence == 0.0 and r.top1_agreement == 1.0
    assert str(path) in r.protocol and ("BOS (id 1)" in r.protocol) is bos


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
    import gc

    from llmq.memory import trim_heap

    # freed heap left by earlier tests may stay resident (counted in the baseline) and hold part of the
    # tensor: in one CI run (session 37) the peak rose by 128 MiB only; garbage and free heap go back first
    gc.collect()
    trim_heap()
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


@pytest.mark.slow
def test_real_model_matches_independent_implementation(smol_folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmq.config import OFFLINE_TEXT
    from llmq.data import load_text, tokenize

    tok = AutoTokenizer.from_pretrained(smol_folder)
    model = AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.float32).eval()
    ids = tokenize(tok, load_text(OFFLINE_TEXT, "evaluation"), max_tokens=20480)
    assert ids.numel() == 20480
    r = evaluate_ids(model, ids, 1024, progress=False)
    assert r.windows == 20 and r.tokens == 20 * 1023
    assert r.perplexity == pytest.approx(reference_ppl(model, ids, 1024), rel=1e-3)
    assert 5 < r.perplexity < 50  # a 135M model on Wikipedia
    assert r.weight_memory_bytes == pytest.approx(134.5e6 * 4, rel=0.01)


def test_seq_len_check_counts_the_bos_token() -> None:
    """A window of seq_len tokens plus a BOS must fit max_position_embeddings; the message says what to use."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from llmq.load import check_seq_len

    m = SimpleNamespace(config=LlamaConfig(max_position_embeddings=256))
    check_seq_len(m, 256, "evaluation.seq_len")
    check_seq_len(m, 255, "evaluation.seq_len", bos=True)
    with pytest.raises(ConfigError, match=r"seq_len is 256 plus a BOS token, beyond .* \(256\); use 255 or less"):
        check_seq_len(m, 256, "evaluation.seq_len", bos=True)
