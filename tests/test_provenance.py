"""Output folders are publishable: no local absolute path in any file, files readable by all, the card's
base model and license found where the model records them, a repo name without file extensions."""

import json
import os
import stat
from pathlib import Path

import pytest
import yaml
from conftest import tiny_llama, tiny_text, tiny_tokenizer

from llmq.card import model_card, repo_name
from llmq.config import Calibration, Evaluation, Quantization, Recipe, Smoothing
from llmq.errors import ConfigError
from llmq.provenance import base_model, license_of, public_path, public_text


def _fp_folder(path: Path, name_or_path: str | None = None) -> Path:
    tiny_llama(tie_word_embeddings=True).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    if name_or_path:  # as transformers < 5 wrote it
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "_name_or_path": name_or_path}))
    return path


def _gguf(path: Path, **meta: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in meta.items():
        w.add_string(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_public_paths():
    assert public_path("/home/me/models/foo") == "foo" and public_path("~/data/c.txt") == "c.txt"
    assert public_path("../up/x.txt") == "x.txt" and public_path("data/x.txt") == "data/x.txt"
    assert public_path("org/name") == "org/name" and public_path("llmq:wiki") == "llmq:wiki"
    text = ("llmq quantize /home/me/m --out=/srv/out/ --calib ~/c.txt over /tmp/e.txt, see "
            "https://huggingface.co/org/name; org/name exp(a / b) ./rel/p")
    assert public_text(text) == ("llmq quantize m --out=out --calib c.txt over e.txt, see "
                                 "https://huggingface.co/org/name; org/name exp(a / b) ./rel/p")


def test_base_model_and_license_sources(tmp_path):
    plain = _fp_folder(tmp_path / "plain")
    assert base_model(str(plain)) == "plain" and license_of(str(plain)) is None
    assert base_model(str(plain), "org/given") == "org/given"
    assert base_model(str(_fp_folder(tmp_path / "rec", "org/recorded"))) == "org/recorded"
    cached = _fp_folder(tmp_path / "hub" / "models--org--cached" / "snapshots" / "0123abc")
    assert base_model(str(cached)) == "org/cached"
    g = _gguf(tmp_path / "m.Q4_1.gguf", **{"general.license": "Apache-2.0",
                                            "general.source.repo_url": "https://huggingface.co/org/src"})
    assert license_of(str(g)) == "apache-2.0" and base_model(str(g)) == "org/src"
    bare = _gguf(tmp_path / "bare.gguf")
    assert license_of(str(bare)) is None and base_model(str(bare)) == "bare.gguf"
    assert base_model("llmq:smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ConfigError, match="Hub id like 'org/name'"):
        Recipe(base_model="/abs/path")


def test_repo_name_has_no_extension():
    assert repo_name("/x/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert repo_name("Llama-3-8B-Q4_K_M.gguf") == "Llama-3-8B" and repo_name("my model.safetensors") == "my-model"
    assert repo_name("qwen2.5-0.5b") == "qwen2.5-0.5b"


def test_output_folder_is_publishable(tmp_path):
    """Absolute paths everywhere in, none out (every file, every byte); every file readable by all; the
    base model recorded in the input's config becomes the card's base_model."""
    import llmq

    src = _fp_folder(tmp_path / "models" / "tiny", "org/tiny-base")
    text = tmp_path / "data" / "calib.txt"
    text.parent.mkdir()
    text.write_text(tiny_text(3000))
    recipe = Recipe(model=str(src), calibration=Calibration(source=str(text), samples=4, seq_len=32),
                    smoothing=Smoothing(alpha=0.5), quantization=Quantization(method="smoothquant"),
                    evaluation=Evaluation(data=str(text), seq_len=64, max_tokens=512))
    out = tmp_path / "out" / "q"
    llmq.run(recipe, out, evaluate=True, progress=False,
             command=f"llmq quantize {src} --calib {text} --out {out} --eval")
    mask = os.umask(0)
    os.umask(mask)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert {"model.safetensors", "act_scales.safetensors", "README.md", "llmq_report.json"} <= {p.name for p in files}
    for p in files:
        assert str(tmp_path).encode() not in p.read_bytes(), p.name
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, (p.name, oct(p.stat().st_mode))
    rep = json.loads((out / "llmq_report.json").read_text())
    assert rep["base_model"] == "org/tiny-base"
    assert rep["command"] == "llmq quantize tiny --calib calib.txt --out q --eval"
    assert rep["calibration"]["source"] == "calib.txt" and rep["evaluation"]["int8"]["data"] == "calib.txt"
    meta = front_matter(model_card(out))
    assert meta["base_model"] == "org/tiny-base" and meta["base_model_relation"] == "quantized"
    assert yaml.safe_load((out / "llmq_recipe.yaml").read_text())["model"] == "tiny"
