"""Sequential (layer-by-layer) quantization writes the in-memory path's checkpoint, tensor for tensor."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_text, tiny_tokenizer

from llmq.config import GROUPS, Calibration, Quantization, Recipe, Smoothing
from llmq.errors import ConfigError
from llmq.report import Report
from llmq.run import run
from llmq.sequential import run_sequential
from llmq.shards import key_map, write_shards

V = 256
# three families of llmq/arch.py with different layouts: llama (GQA, rotary, untied head), opt (learned
# positions, biases, tied head), gpt_neox (fused qkv, parallel residual, partial rotary, no base "model.")
FAMILIES = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=False)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=128)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=128)),
}  # (qwen2 would pick Qwen2Tokenizer for the tiny word-level tokenizer and get no tokens)
CASES = [("smoothquant", 0.5), ("smoothquant", "auto"), ("llm-int8", None), ("weight-only", "auto")]


def _fp_folder(tmp_path: Path, family: str, shard: str | None = None) -> Path:
    import transformers
    from transformers import AutoModelForCausalLM

    name, kw = FAMILIES[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, name)(vocab_size=V, **kw))
    with torch.no_grad():  # outlier channels, so smoothing has something to move
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n.endswith("layer_norm.weight"):
                p[::7] *= 8
    folder = tmp_path / f"fp-{family}"
    model.save_pretrained(folder, max_shard_size=shard or "5GB")
    tiny_tokenizer(V).save_pretrained(folder)
    return folder


def _recipe(model: Path, text: Path, method: str, alpha) -> Recipe:
    return Recipe(model=str(model), calibration=Calibration(source=str(text), samples=6, seq_len=32),
                  smoothing=Smoothing(alpha=alpha if alpha is not None else "auto", auto_tokens=64,
                                    guard_windows=0),
                  quantization=Quantization(method=method))


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "act_scales.safetensors":
            out.update(load_file(str(f)))
    return out


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # stock transformers
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def text(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(tiny_text(3000, V))
    return p


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method,alpha", CASES)
def test_sequential_equals_in_memory(tmp_path, text, family, method, alpha):
    fp = _fp_folder(tmp_path, family, shard="60KB" if family == "llama" else None)
    if family == "llama":
        assert (fp / "model.safetensors.index.json").is_file()  # the input is sharded
    recipe = _recipe(fp, text, method, alpha)
    _assert_same_outputs(recipe, tmp_path, {"llama": 7, "opt": 6, "gpt_neox": 4}[family] * 3)


def test_sequential_equals_in_memory_with_a16(tmp_path, text):
    """quantization.a16 (llmq/a16.py) lays each layer out in the per-layer stage, so both drivers agree."""
    from llmq.config import A16_THRESHOLD

    recipe = _recipe(_fp_folder(tmp_path, "llama"), text, "smoothquant", "auto")
    rep = _assert_same_outputs(recipe.override({"quantization.a16": ["down_proj"]}), tmp_path, 21)
    assert rep.threshold == A16_THRESHOLD and rep.a16["count"] == 3 and rep.a16["scales_log2"]


@pytest.mark.parametrize("alpha,reuse", [(0.0, False), (0.0, True), (0.5, True)])
def test_sequential_equals_in_memory_without_calibration(tmp_path, text, alpha, reuse, monkeypatch):
    """alpha 0 skips calibration, --act-scales reuses it; both still check the fp16 range on window 0
    (round-to-nearest weights: GPTQ would need the calibration pass for its Hessians)."""
    from dataclasses import replace

    import llmq.stage
    from llmq.layers import Feed

    checked = []
    real = llmq.stage.check_fp16_range
    monkeypatch.setattr(llmq.stage, "check_fp16_range",
                        lambda root, ids, **k: (isinstance(root, Feed) and checked.append(root), real(root, ids, **k)))
    fp = _fp_folder(tmp_path, "llama")
    recipe = _recipe(fp, text, "smoothquant", alpha).override({"quantization.gptq": False})
    if reuse:
        run(_recipe(fp, text, "smoothquant", 0.5), tmp_path / "first", progress=False)
        scales = str(tmp_path / "first" / "act_scales.safetensors")
        recipe = replace(recipe, calibration=replace(recipe.calibration, act_scales=scales))
        checked.clear()
    rep = _assert_same_outputs(recipe, tmp_path, 7 * 3)
    assert rep.calibration.tokens == 0 and len(checked) == 6  # every layer's fp16 range, in both drivers
    assert (tmp_path / "seq" / "act_scales.safetensors").exists() == reuse


def _assert_same_outputs(recipe: Recipe, tmp_path: Path, n_int8: int) -> Report:
    """Both paths on `recipe`: same files, configs, reports, tensors (bit for bit) and reloaded logits."""
    rep_mem = run(recipe, tmp_path / "mem", progress=False)
    rep_seq = run_sequential(recipe, tmp_path / "seq", progress=False)
    mem, seq = tmp_path / "mem", tmp_path / "seq"
    assert sorted(p.name for p in seq.iterdir()) == sorted(p.name for p in mem.iterdir())
    assert json.loads((seq / "config.json").read_text()) == json.loads((mem / "config.json").read_text())
    for name in ("generation_config.json", "tokenizer.json", "llmq_recipe.yaml"):
        assert (seq / name).read_text() == (mem / name).read_text(), name
    assert list(rep_seq.to_dict()) == list(rep_mem.to_dict())
    assert rep_seq.alphas == rep_mem.alphas and rep_seq.calibration == rep_mem.calibration
    assert rep_seq.storage == rep_mem.storage  # auto's storage dtype from the same measured range
    assert rep_seq.a16 == rep_mem.a16  # quantization.a16: the same rescaling, layer by layer
    assert rep_seq.refined == rep_mem.refined  # refine auto: on in both (no guard), the same scales
    auto_w8a8 = recipe.smoothing.alpha == "auto" and recipe.quantization.method == "smoothquant"
    assert (rep_seq.refined is not None and rep_seq.refined["groups"] == list(GROUPS)) == auto_w8a8
    assert rep_seq.quantize.mode == "sequential"

    a, b = _tensors(mem), _tensors(seq)
    assert sorted(a) == sorted(b)
    assert len([k for k in a if a[k].dtype == torch.int8]) == n_int8
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    if (mem / "act_scales.safetensors").exists():
        sa, sb = _tensors_file(mem / "act_scales.safetensors"), _tensors_file(seq / "act_scales.safetensors")
        assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    ids = torch.randint(3, V, (2, 24), generator=torch.Generator().manual_seed(1))
    lm, ls = _logits(mem, ids), _logits(seq, ids)
    assert torch.isfinite(lm).all()
    assert (lm - ls).abs().max().item() <= 1e-5
    return rep_seq


@pytest.mark.parametrize("dtype,storage", [("bfloat16", "float32"), ("float16", "bfloat16")])
def test_sequential_equals_in_memory_through_the_run_dtype(tmp_path, text, dtype, storage):
    """The non-layer tensors go through the run dtype on their way to storage, as in memory: a float32
    checkpoint run in bfloat16 and stored in float32 holds bfloat16-rounded values, not the input's bytes."""
    recipe = _recipe(_fp_folder(tmp_path, "llama"), text, "smoothquant", 0.5)
    _assert_same_outputs(recipe.override({"dtype": dtype, "quantization.storage_dtype": storage}), tmp_path, 21)


@pytest.mark.parametrize("scale,key", [(1.0, "model.embed_tokens.weight"), (5e5, "model.embed_tokens.weight"),
                                       (5e5, "lm_head.weight")])
def test_auto_storage_follows_the_measured_range(tmp_path, text, scale, key):
    """auto from a float32 run stores the non-int8 tensors in float16 when every activation the int8 layers
    produced on the calibration windows, and every weight stored in 16-bit, stays within half its range, else
    in bfloat16; both drivers decide alike. Scaled embeddings put the residual stream at ~4e4: finite in
    float16 (65504), but too close. A scaled head (untied: never loaded while the sequential driver catches
    the layer inputs) is measured on disk."""
    from safetensors.torch import load_file, save_file

    fp = _fp_folder(tmp_path, "llama")
    sd = load_file(str(fp / "model.safetensors"))
    sd[key] *= scale
    save_file(sd, str(fp / "model.safetensors"), {"format": "pt"})
    rep = _assert_same_outputs(_recipe(fp, text, "smoothquant", 0.5), tmp_path, 7 * 3)
    want = "float16" if scale == 1.0 else "bfloat16"
    assert rep.storage["dtype"] == want and json.loads((tmp_path / "seq" / "config.json").read_text())["dtype"] == want
    assert (rep.storage["value_max"] * 2 <= 65504) == (scale == 1.0)
    assert ("within" if scale == 1.0 else "beyond") in rep.storage["why"]
    assert {t.dtype for k, t in _tensors(tmp_path / "seq").items() if k.endswith("norm.weight")} == {
        getattr(torch, want)}


def test_feed_measures_the_largest_output_of_any_module():
    """advance_ returns the largest |value| any module of the layer output (a linear's -30 before the ReLU
    clips it), and inf when something was nan."""
    from torch import nn

    from llmq.layers import Feed

    layer = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU())
    with torch.no_grad():
        layer[0].weight.copy_(-3 * torch.eye(4))
    inputs = [torch.tensor([[[10.0, 1.0, 2.0, 0.5]]])]
    feed = Feed("model.layers.0", layer, inputs, [((), {})], torch.device("cpu"))
    assert feed.advance_() == 30.0 and torch.equal(inputs[0], torch.tensor([[[0.0, 0.0, 0.0, 0.0]]]))
    feed.inputs[0] = torch.tensor([[[float("nan"), 1.0, 2.0, 0.5]]])
    assert feed.advance_() == float("inf")


def _tensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("storage", ["float32", "auto"])
def test_one_float_layer_at_a_time(tmp_path, text, monkeypatch, storage):
    """Never more than one decoder layer holds real weights (the others are meta or freed)."""
    import llmq.shards as shards

    fp = _fp_folder(tmp_path, "llama")
    seen = []
    real_load = shards.load_tensors_

    def load_(model, keys, kmap):
        real_load(model, keys, kmap)
        layers = model.get_submodule("model.layers")
        seen.append((sum(any(not p.is_meta for p in m.parameters()) for m in layers),
                     not model.model.embed_tokens.weight.is_meta))
        assert model.lm_head.weight.is_meta  # untied: never run while the inputs are caught, never loaded

    monkeypatch.setattr(shards, "load_tensors_", load_)
    real_cast, cast = shards.write_cast, []

    def write_cast(dest, items):
        cast.extend(items)
        real_cast(dest, items)

    monkeypatch.setattr(shards, "write_cast", write_cast)
    recipe = _recipe(fp, text, "smoothquant", 0.5).override({"quantization.storage_dtype": storage})
    run_sequential(recipe, tmp_path / "out", progress=False)
    # embeddings etc. and layer 0 (which the catcher runs once) for catching the layer inputs, then one layer
    # at a time (embeddings freed meanwhile; layer 0 is not read again); at the end, non-layer tensors stored
    # as they are in the input (float32) are copied from the input file without being loaded; those cast to
    # 16-bit (auto: float16, the tiny model's range fits) are cast a piece at a time on their way to the
    # output, never loaded whole
    assert seen == [(0, True), (1, True), (1, False), (1, False), (0, False)]
    assert sorted(name for name, *_ in cast) == ([] if storage == "float32" else
                                                 ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"])
    out = _tensors_file(tmp_path / "out" / "model.safetensors")
    assert out["model.embed_tokens.weight"].dtype == (torch.float32 if storage == "float32" else torch.float16)


def test_write_cast_equals_a_whole_cast_piece_by_piece(tmp_path, monkeypatch):
    """shards.write_cast reads, casts and writes a tensor a few rows at a time: the same values as loading it
    whole in the `via` dtype and casting that to `to` (float32 -> bfloat16 -> float16 rounds twice), for
    matrices, vectors and scalars; a tensor that is not finite in `via` is refused by name."""
    from safetensors.torch import save_file

    import llmq.shards as shards
    from llmq.errors import NumericalError

    g = torch.Generator().manual_seed(0)
    src = {"emb": torch.randn(37, 5, generator=g) * 300, "norm": torch.randn(11, generator=g), "s": torch.tensor(3.3)}
    save_file(src, str(tmp_path / "in.safetensors"))
    monkeypatch.setattr(shards, "_CHUNK", 3 * 5 * 4)  # 3 rows of emb, 1 element of norm per piece
    items = [(f"out.{k}", f"model.{k}", k, tmp_path / "in.safetensors", torch.bfloat16, torch.float16) for k in src]
    shards.write_cast(tmp_path / "out.safetensors", items)
    out = _tensors_file(tmp_path / "out.safetensors")
    assert sorted(out) == ["out.emb", "out.norm", "out.s"]
    for k, t in src.items():
        want = t.to(torch.bfloat16).to(torch.float16)
        assert out[f"out.{k}"].dtype == torch.float16 and torch.equal(out[f"out.{k}"], want)
    assert not torch.equal(out["out.emb"], src["emb"].to(torch.float16))  # the cast via bfloat16 is kept
    src["emb"][30, 2] = float("inf")
    save_file(src, str(tmp_path / "in.safetensors"))
    with pytest.raises(NumericalError, match=r"inf/nan in model\.emb"):
        shards.write_cast(tmp_path / "bad.safetensors", items)


def test_output_shards_match_save_pretrained(tmp_path):
    """write_shards lays out a checkpoint like save_pretrained: file names, index, tensors."""
    from conftest import tiny_llama

    from llmq.quantize import quantize_
    from llmq.shards import stage

    model = tiny_llama(num_hidden_layers=3)
    quantize_(model, Quantization(method="llm-int8"), progress=False)
    limit = 60_000
    model.save_pretrained(tmp_path / "ref", max_shard_size=limit)
    sd = model.state_dict()
    keys = list(sd)
    staged = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    stage(model, {k: sd[k] for k in keys[::2]}, staged[0])
    stage(model, {k: sd[k] for k in keys[1::2]}, staged[1])
    (tmp_path / "out").mkdir()
    names = write_shards(staged, keys, tmp_path / "out", total_parameters=model.num_parameters(),
                         max_shard_bytes=limit)
    assert len(names) > 1 and not any(p.exists() for p in staged)
    ref_index = json.loads((tmp_path / "ref" / "model.safetensors.index.json").read_text())
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index == ref_index
    a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_output_equals_in_memory(tmp_path, text, monkeypatch):
    """With outputs over the shard size, both paths write the same shard files and index."""
    import sys

    import llmq.run  # noqa: F401  (llmq.run is the function; the module is sys.modules["llmq.run"])
    import llmq.shards
    from llmq.save import save_checkpoint

    limit = 50_000

    def small_shards(model, tok, folder):
        save_checkpoint(model, tok, folder)
        for f in folder.glob("model*.safetensors"):
            f.unlink()
        model.save_pretrained(folder, max_shard_size=limit)

    monkeypatch.setattr(sys.modules["llmq.run"], "save_checkpoint", small_shards)
    monkeypatch.setattr(llmq.shards, "MAX_SHARD_BYTES", limit)
    recipe = _recipe(_fp_folder(tmp_path, "llama"), text, "smoothquant", 0.5)
    run(recipe, tmp_path / "mem", progress=False)
    run_sequential(recipe, tmp_path / "seq", progress=False)
    index = "model.safetensors.index.json"
    assert len(list((tmp_path / "mem").glob("model-*.safetensors"))) > 1
    assert json.loads((tmp_path / "seq" / index).read_text()) == json.loads((tmp_path / "mem" / index).read_text())
    assert sorted(p.name for p in (tmp_path / "seq").iterdir()) == sorted(p.name for p in (tmp_path / "mem").iterdir())
    for f in (tmp_path / "mem").glob("model-*.safetensors"):
        a, b = _tensors_file(f), _tensors_file(tmp_path / "seq" / f.name)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_gguf_and_bin_checkpoints_are_refused(tmp_path, text):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ConfigError, match="safetensors"):
        run_sequential(_recipe(gguf, text, "llm-int8", None), tmp_path / "o1", progress=False)
    fp = _fp_folder(tmp_path, "llama")
    from safetensors.torch import load_file

    torch.save(load_file(str(fp / "model.safetensors")), fp / "pytorch_model.bin")
    (fp / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="pytorch_model.bin"):
        run_sequential(_recipe(fp, text, "llm-int8", None), tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_checkpoint_keys_are_renamed_like_from_pretrained():
    """Legacy names (GPT-NeoX embed_out -> lm_head) and a missing base-model prefix, as from_pretrained."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    name, kw = FAMILIES["gpt_neox"]
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(getattr(transformers, name)(vocab_size=V, **kw))
    f = Path("x.safetensors")
    got = key_map(model, {"embed_out.weight": f, "layers.0.attention.dense.weight": f,
                           "gpt_neox.final_layer_norm.bias": f, "stray.weight": f})
    assert got == {"lm_head.weight": ("embed_out.weight", f),
                   "gpt_neox.layers.0.attention.dense.weight": ("layers.0.attention.dense.weight", f),
                   "gpt_neox.final_layer_norm.bias": ("gpt_neox.final_layer_norm.bias", f)}
    assert len(model._weight_conversions) == 1  # reverted on save


def test_cli_picks_sequential_when_in_memory_does_not_fit(tmp_path, text, caplog):
    import logging

    from llmq.cli import main
    from llmq.plan import estimate

    fp = _fp_folder(tmp_path, "llama")
    # round-to-nearest: no calibration windows, so the sequential peak is one layer (GPTQ's would hold the
    # calibration hidden states, more than this tiny model's weights)
    plan = estimate(str(fp), method="llm-int8", dtype="float32", calib_samples=6, calib_seq_len=32, gptq=False)
    budget = (plan.sequential_peak_bytes + plan.in_memory_peak_bytes) // 2
    base = ["quantize", str(fp), "--method", "llm-int8", "--device", "cpu", "--dtype", "float32", "--no-gptq"]
    with caplog.at_level(logging.INFO, logger="llmq"):
        assert main([*base, "--max-memory", f"cpu={budget}", "--out", str(tmp_path / "auto")]) == 0
    assert "mode: sequential (in-memory needs" in caplog.text
    assert json.loads((tmp_path / "auto" / "llmq_report.json").read_text())["quantize"]["mode"] == "sequential"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="llmq"):
        assert main([*base, "--max-memory", "cpu=64GiB", "--out", str(tmp_path / "mem")]) == 0
    assert "mode: in-memory" in caplog.text
    report = json.loads((tmp_path / "mem" / "llmq_report.json").read_text())
    assert report["quantize"]["mode"] == "in-memory"
    assert main([*base, "--sequential", "--eval", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smollm2_sequential_equals_in_memory(tmp_path):
    recipe = Recipe(model="llmq:smollm2", calibration=Calibration(samples=8, seq_len=128),
                    smoothing=Smoothing(alpha=0.5))
    run(recipe, tmp_path / "mem", progress=False)
    run_sequential(recipe, tmp_path / "seq", progress=False)
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "seq")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(3, 49152, (1, 64), generator=torch.Generator().manual_seed(3))
    assert (_logits(tmp_path / "mem", ids) - _logits(tmp_path / "seq", ids)).abs().max().item() <= 1e-5
