"""Decode speed (llmq/speed.py): exact token counts, greedy with a KV cache, interleaved ratios, the int8 +
16-bit-rest models, and `llmq eval --decode`. Tiny random models, CPU, seconds; no timing is asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, tiny_text, tiny_tokenizer

from llmq.config import Quantization
from llmq.errors import ConfigError, DataError
from llmq.quantize import quantize_
from llmq.speed import (
    Decode,
    compare_decode,
    decode_speed,
    format_decode,
    int8_method,
    matching_prefix,
    paired_ratio,
    prompt_ids,
    speed_caveat,
)

NEW = 6


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(3, 256, (24,), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def greedy_with_cache(model, ids: torch.Tensor, n: int) -> list[int]:
    """Independent greedy loop: one forward over the prompt, then one token at a time on the KV cache."""
    out = model(ids[None], use_cache=True)
    past, new = out.past_key_values, []
    for _ in range(n):
        tok = int(out.logits[0, -1].argmax())
        new.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return new


@pytest.mark.parametrize("kw", [dict(prompt_tokens=0), dict(new_tokens=1), dict(repeats=0), dict(warmup=-1),
                                dict(repeats=True), dict(data="")])
def test_decode_config_is_validated(kw: dict) -> None:
    with pytest.raises(ConfigError, match="decode"):
        Decode(**kw)


def test_greedy_tokens_match_an_independent_cached_loop(prompt: torch.Tensor) -> None:
    m = tiny_llama()
    r = compare_decode({"m": m}, prompt, Decode(new_tokens=NEW, repeats=2, warmup=0))["m"]
    assert r.generated == greedy_with_cache(m, prompt, NEW)
    assert r.deterministic and len(r.runs) == 2 and r.prompt_tokens == prompt.numel()
    assert r.decode_tokens_per_second == pytest.approx(1 / r.decode_seconds_per_token)
    assert r.prefill_tokens_per_second == pytest.approx(prompt.numel() / r.prefill_seconds)
    assert all(x["generate_s"] >= x["prefill_s"] > 0 for x in r.runs)
    assert r.int8_method is None and r.dtype == "float32" and r.weight_memory_bytes > 0


def test_eos_cannot_shorten_a_run(prompt: torch.Tensor) -> None:
    m = tiny_llama()
    first = greedy_with_cache(m, prompt, 1)[0]
    m.generation_config.eos_token_id = first  # greedy would stop at once without min_new_tokens
    m.generation_config.pad_token_id = first
    r = compare_decode({"m": m}, prompt, Decode(new_tokens=NEW, repeats=1, warmup=0))["m"]
    assert len(r.generated) == NEW and first not in r.generated  # EOS is suppressed until the count is met


def test_interleaved_ratios_are_paired_medians(prompt: torch.Tensor) -> None:
    a, b = tiny_llama(), tiny_llama(num_hidden_layers=4)
    res = compare_decode({"a": a, "b": b}, prompt, Decode(new_tokens=NEW, repeats=3, warmup=1))
    ra, rb = res["a"], res["b"]
    assert set(ra.ratios) == {"b"} and set(rb.ratios) == {"a"}
    assert ra.ratios["b"] == pytest.approx(paired_ratio(ra, rb))
    want = sorted(y["decode_s_per_token"] / x["decode_s_per_token"] for x, y in zip(ra.runs, rb.runs, strict=True))[1]
    assert ra.ratios["b"] == pytest.approx(want)
    assert "interleaved across 2 models" in ra.protocol
    table = format_decode(res)
    assert "decode tokens/s" in table and "decode speed / a" in table and "decode speed / b" in table


@pytest.mark.parametrize("method", ["smoothquant", "llm-int8", "weight-only"])
def test_int8_with_16bit_rest_decodes_and_is_what_stock_loading_gives(method: str, tmp_path: Path,
                                                                       prompt: torch.Tensor) -> None:
    """An int8 model with bfloat16 non-linear parts is the saved checkpoint loaded with dtype=bfloat16."""
    import bitsandbytes as bnb

    from llmq.load import load
    from llmq.save import save_checkpoint

    q = tiny_llama()
    quantize_(q, Quantization(method=method), progress=False)
    assert int8_method(q) == method
    save_checkpoint(q, tiny_tokenizer(), tmp_path)
    m, _ = load(str(tmp_path), dtype="bfloat16", device="cpu")
    lin = m.model.layers[0].self_attn.q_proj
    assert isinstance(lin, bnb.nn.Linear8bitLt) and lin.weight.dtype == torch.int8
    assert m.model.norm.weight.dtype == torch.bfloat16 and m.lm_head.weight.dtype == torch.bfloat16
    assert int8_method(m) == method
    res = compare_decode({"int8+fp32": q, "int8+bf16": m}, prompt, Decode(new_tokens=NEW, repeats=1, warmup=0))
    assert res["int8+bf16"].dtype == "bfloat16+int8" and res["int8+fp32"].dtype == "float32+int8"
    assert len(res["int8+bf16"].generated) == NEW
    assert matching_prefix(res["int8+fp32"].generated, res["int8+fp32"].generated) == NEW


def test_prompt_from_text_and_too_short_text(tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text(tiny_text(50))
    tok = tiny_tokenizer()
    assert prompt_ids(tok, Decode(data=str(f), prompt_tokens=40)).numel() == 40
    with pytest.raises(DataError, match="fewer than decode.prompt_tokens"):
        prompt_ids(tok, Decode(data=str(f), prompt_tokens=80))
    r = decode_speed(tiny_llama(), tok, Decode(data=str(f), prompt_tokens=16, new_tokens=3, repeats=1, warmup=0))
    assert r.data == str(f) and len(r.generated) == 3
    with pytest.raises(ConfigError, match="max_position_embeddings"):  # tiny_llama has 256 positions
        decode_speed(tiny_llama(), tok, Decode(data=str(f), prompt_tokens=16, new_tokens=250))


def test_caveats_say_slower_plainly() -> None:
    assert speed_caveat(None, "cpu") is None and speed_caveat("smoothquant", "cpu") is None
    assert speed_caveat("smoothquant", "cpu", ratio=1.2) is None
    s = speed_caveat("weight-only", "cpu", ratio=0.45, versus="bfloat16")
    assert "0.45x" in s and "slower" in s and "dequantizes" in s
    assert "0.60x" in speed_caveat("llm-int8", "cuda", ratio=0.6) and "batch 1" in speed_caveat("llm-int8", "cuda")
    assert "expected to decode slower" in speed_caveat("weight-only", "cpu")
    assert matching_prefix([1, 2, 3], [1, 2, 4]) == 2 and matching_prefix([], [1]) == 0


def test_cli_eval_decode_with_reference(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llmq.cli import main
    from llmq.save import save_checkpoint

    tok = tiny_tokenizer()
    fp, q = tmp_path / "fp", tmp_path / "wo"
    save_checkpoint(tiny_llama(), tok, fp)
    wo = tiny_llama()
    quantize_(wo, Quantization(method="weight-only"), progress=False)
    save_checkpoint(wo, tok, q)
    text = tmp_path / "t.txt"
    text.write_text(tiny_text(400))
    out = tmp_path / "r.json"
    rc = main(["-q", "eval", str(q), "--reference", str(fp), "--data", str(text), "--seq-len", "64",
               "--max-tokens", "128", "--device", "cpu", "--decode", "--decode-prompt-tokens", "32",
               "--decode-new-tokens", "4", "--decode-repeats", "2", "--json", str(out)])
    shown = capsys.readouterr().out
    assert rc == 0 and "decode tokens/s" in shown and "decode speed / reference" in shown
    data = json.loads(out.read_text())
    assert data["perplexity"] > 0 and set(data["decode"]) == {"model", "reference"}
    dec = data["decode"]["model"]
    assert dec["int8_method"] == "weight-only" and dec["new_tokens"] == 4 and len(dec["runs"]) == 2
    ratio = dec["ratios"]["reference"]
    assert (data["decode_note"] is None) == (ratio >= 1)  # slower: the note says so with the ratio
    if ratio < 1:
        assert f"{ratio:.2f}x" in data["decode_note"] and f"note: {data['decode_note']}" in shown


def test_cli_rejects_bad_decode_flags(capsys: pytest.CaptureFixture) -> None:
    from llmq.cli import main

    assert main(["-q", "eval", "no/such/model/x", "--decode", "--decode-new-tokens", "1"]) == 2
    assert "decode.new_tokens must be an integer >= 2" in capsys.readouterr().err
