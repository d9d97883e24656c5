"""FP vs INT8 with one model in memory at a time: the same numbers as side by side, the reference freed
before the model loads, reference logits read back exactly, and a clear error without temporary space."""

import importlib
import weakref

import pytest
import torch
from conftest import tiny_llama, tiny_text, tiny_tokenizer

from llmq.compare import ReferenceLogits, evaluate_pair
from llmq.config import Evaluation, Recipe, Smoothing
from llmq.errors import OutputError

ev = importlib.import_module("llmq.evaluate")  # the module: the package attribute `llmq.evaluate` is the function


@pytest.fixture
def pair(tmp_path):
    """(int8 folder, fp folder, eval text) of a tiny llama, smoothquant alpha 0.5, default storage dtype."""
    from llmq.run import quantize_model_
    from llmq.save import save_checkpoint

    fp, q, text = tmp_path / "fp", tmp_path / "q", tmp_path / "eval.txt"
    tiny_llama(tie_word_embeddings=True).save_pretrained(fp)
    tiny_tokenizer().save_pretrained(fp)
    text.write_text(tiny_text(2000))
    model, tok = tiny_llama(tie_word_embeddings=True), tiny_tokenizer()
    windows = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize_model_(model, tok, Recipe(smoothing=Smoothing(alpha=0.5)), windows=windows, progress=False)
    save_checkpoint(model, tok, q)
    return q, fp, text


CPU = {"device": "cpu"}


def test_pair_equals_side_by_side(pair, monkeypatch):
    from llmq.load import load

    q, fp, text = pair
    cfg = Evaluation(data=str(text), seq_len=100, max_tokens=700)
    monkeypatch.setattr(ev, "_CHUNK_ELEMENTS", 16 * 256)  # 16 rows of the 256-token vocabulary at a time
    r, r_ref = evaluate_pair(str(q), str(fp), cfg, model_kw=CPU, reference_kw=CPU, reference_name="fp",
                             progress=False)
    monkeypatch.undo()
    m, tok = load(str(q), device="cpu")
    ref, _ = load(str(fp), device="cpu")
    side = ev.evaluate(m, tok, cfg, reference=ref, progress=False)
    alone = ev.evaluate(ref, tok, cfg, progress=False)
    assert r.dtype == "float16+int8" and r_ref.dtype == "float32"  # the checkpoint's own dtype (auto storage)
    assert r.reference == "fp" and r.tokens == side.tokens == r_ref.tokens
    assert r.perplexity == pytest.approx(side.perplexity, rel=1e-12)
    assert r_ref.perplexity == pytest.approx(alone.perplexity, rel=1e-12)
    assert r.kl_divergence == pytest.approx(side.kl_divergence, rel=1e-9) and r.kl_divergence > 0
    assert r.top1_agreement == side.top1_agreement


def test_run_dtype_of_the_non_int8_parts_is_selectable(pair):
    from llmq.load import load

    q, _, _ = pair
    for dtype, want in (("auto", torch.float16), ("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        m, _ = load(str(q), dtype=dtype, device="cpu")
        assert {p.dtype for p in m.parameters()} == {want, torch.int8}, dtype


def test_reference_is_freed_before_the_model_loads(pair, monkeypatch):
    loader = importlib.import_module("llmq.load")
    q, fp, text = pair
    real, loaded = loader.load, []

    def spy(model, **kw):
        alive = [name for name, ref in loaded if ref() is not None]
        m, tok = real(model, **kw)
        loaded.append((model, weakref.ref(m)))
        spy.alive_at_load.append(alive)
        return m, tok

    spy.alive_at_load = []
    monkeypatch.setattr(loader, "load", spy)
    evaluate_pair(str(q), str(fp), Evaluation(data=str(text), seq_len=64, max_tokens=256), model_kw=CPU,
                  reference_kw=CPU, progress=False)
    assert [m for m, _ in loaded] == [str(fp), str(q)] and spy.alive_at_load == [[], []]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_logits_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    wins = [torch.randn(n, 11, generator=g).to(dtype) for n in (7, 3)]
    with ReferenceLogits(total_rows=10) as store:
        for i, w in enumerate(wins):
            store.append(i, torch.arange(w.shape[0] + 1), w)
        store.check(1, torch.arange(4), 11)
        assert torch.equal(store.rows(0, 2, 6), wins[0][2:6]) and torch.equal(store.rows(1, 0, 99), wins[1])
        assert torch.equal(store.rows(0, 5, 7), wins[0][5:])
        with pytest.raises(RuntimeError, match="other tokens"):
            store.check(0, torch.arange(7), 11)


def test_no_temporary_space_is_a_user_error(monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))
    with ReferenceLogits(total_rows=20_000) as store, pytest.raises(OutputError, match="set TMPDIR"):
        store.append(0, torch.arange(3), torch.zeros(2, 49152))


@pytest.mark.slow
def test_smollm2_checkpoint_size_and_eval_memory(tmp_path, smol_folder):
    """Issue 12 on the real model: the tied 49152 x 576 embedding is stored in 16-bit, so the W8A8 checkpoint
    is ~0.61x the fp16 one (0.82x with it in float32; the floor with int8 linears and a 16-bit embedding is
    0.605x), and `quantize --eval` measures INT8 below FP in peak memory, each model alone in memory."""
    from safetensors import safe_open

    import llmq

    with safe_open(str(smol_folder / "model.safetensors"), "pt") as f:
        fp16_bytes = 2 * sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    recipe = Recipe(smoothing=Smoothing(alpha=0.0)).override(
        {"calibration.samples": 2, "evaluation.seq_len": 512, "evaluation.max_tokens": 1024})
    rep = llmq.run(recipe, tmp_path / "q", evaluate=True, progress=False)
    ratio = (tmp_path / "q" / "model.safetensors").stat().st_size / fp16_bytes
    assert ratio <= 0.61, ratio
    fp, q = rep.evaluation["fp"], rep.evaluation["int8"]
    assert q["dtype"] == rep.storage["dtype"] + "+int8" and q["kl_divergence"] < 0.1
    assert q["peak_memory_bytes"] <= fp["peak_memory_bytes"], (q["peak_memory_bytes"], fp["peak_memory_bytes"])
