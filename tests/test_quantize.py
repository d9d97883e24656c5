"""Int8 conversion, the smoothquant pipeline, and checkpoints that stock transformers reloads."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama, tiny_text, tiny_tokenizer
from test_smooth import CASES as SMOOTH_CASES
from test_smooth import V, _build

from llmq.config import Calibration, Quantization, Recipe, Smoothing
from llmq.quantize import linear_names, quantize_, skipped
from llmq.run import quantize_model_
from llmq.save import save_checkpoint

RELOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    out = m(ids).logits
assert "llmq" not in sys.modules
torch.save({"logits": out, "types": sorted({type(x).__name__ for x in m.modules()})}, sys.argv[3])
"""


def _windows(n=8, seq=32, seed=1):
    return torch.randint(3, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def _recipe(method, alpha=0.5):
    return Recipe(calibration=Calibration(samples=8, seq_len=32),
                  smoothing=Smoothing(alpha=alpha, auto_tokens=64), quantization=Quantization(method=method))


def test_skip_rule():
    assert skipped("lm_head", ("lm_head",)) and skipped("model.lm_head", ("lm_head",))
    assert not skipped("model.layers.0.mlp.up_proj", ("lm_head",))
    assert skipped("model.layers.0.mlp.up_proj", ("model.layers.0.mlp.up_proj",))


@pytest.mark.parametrize("key", ["lm_head", "down_proj", "proj", "mlp.c_proj", "model.layers.1", "layers.1",
                                 r"model\.layers\.[01]\.mlp", "fc2", "q_proj"])
def test_skip_rule_is_stock_transformers_rule(key):
    """What llmq keeps in float is what a stock reload keeps in float for llm_int8_skip_modules=[key]
    (a suffix without a dot boundary, such as `proj`, matches in transformers, so it must here too)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = [n for n, _ in tiny_llama().named_modules()] + ["h.0.attn.c_proj", "h.0.mlp.c_proj", "model.layers.11.mlp"]
    assert [skipped(n, (key,)) for n in names] == [not should_convert_module(n, [key]) for n in names]
    from llmq.quantize import _should_convert_v5  # the copy used where transformers has no such function

    assert [_should_convert_v5(n, [key]) for n in names] == [should_convert_module(n, [key]) for n in names]
    assert skipped("model.layers.0.mlp.down_proj", ("proj",))


def test_skip_entry_matching_nothing_warns_and_bad_pattern_is_an_error(caplog):
    from llmq.errors import ConfigError
    from llmq.quantize import check_skip_matches

    names = [n for n, _ in tiny_llama().named_modules()]
    with caplog.at_level("WARNING", logger="llmq.quantize"):
        check_skip_matches(names, ("lm_head", "dwn_proj"))
    assert "'dwn_proj' matches no module" in caplog.text and "'lm_head'" not in caplog.text
    with pytest.raises(ConfigError, match="not a valid pattern"):
        skipped("model.layers.0.mlp.up_proj", ("mlp.(",))


def _tiny_falcon():
    from transformers import AutoModelForCausalLM, FalconConfig

    cfg = FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       new_decoder_architecture=True, num_kv_heads=2)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_cli_skip_adds_to_the_recipes_skip():
    """`--skip down_proj` keeps lm_head skipped too (it used to replace the list, quantizing lm_head)."""
    from llmq.args import build_parser, recipe_from_args

    def skip(*argv):
        return recipe_from_args(build_parser().parse_args(["quantize", "m", "--out", "o", *argv])).quantization.skip

    assert skip() == ("lm_head",)
    assert skip("--skip", "down_proj", "--skip", "lm_head", "--skip", "o_proj") == ("lm_head", "down_proj", "o_proj")
    assert skip("--set", "quantization.skip=[q_proj]", "--skip", "k_proj") == ("q_proj",)  # --set is explicit: last


def test_falcon_is_refused_by_every_method_and_the_planner():
    """FalconLinear subclasses nn.Linear; transformers' bitsandbytes loader replaces exact nn.Linear only, so
    a 'quantized' Falcon would be float weights under an int8 quantization_config. Every path refuses it."""
    from llmq.errors import UnsupportedArchitecture
    from llmq.plan import estimate
    from llmq.smooth import smooth_targets

    model = _tiny_falcon()
    assert {type(m).__name__ for m in model.modules()} >= {"FalconLinear"}
    for call in (lambda: smooth_targets(model), lambda: linear_names(model, ("lm_head",)),
                 *[lambda m=m: quantize_(model, Quantization(method=m), progress=False)
                   for m in ("smoothquant", "llm-int8", "weight-only")],
                 lambda: estimate(model.config, method="llm-int8", calib_samples=2, calib_seq_len=16)):
        with pytest.raises(UnsupportedArchitecture, match="'falcon'.*FalconLinear.*keep this model in 16-bit"):
            call()
    assert not any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    assert not hasattr(model.config, "quantization_config")


class _MyLinear(torch.nn.Linear):
    pass


def _subclass_(model, names):
    for n in names:
        parent, _, child = n.rpartition(".")
        old = model.get_submodule(n)
        new = _MyLinear(old.in_features, old.out_features, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        setattr(model.get_submodule(parent), child, new)


def test_a_family_needing_a_missing_package_is_a_one_line_error(tmp_path, monkeypatch):
    """Gemma 3n builds its vision tower through timm; without it transformers raises a multi-line ImportError,
    which was a traceback (llmq plan / quantize build the model's skeleton first). Now: one line, naming the
    package and how to install it."""
    import transformers
    from conftest import tiny_llama, tiny_tokenizer

    from llmq.errors import ModelLoadError
    from llmq.load import load, skeleton

    model = tiny_llama()
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)

    def missing(*args, **kwargs):
        raise ImportError("\nTimmWrapperModel requires the timm library but it was not found in your environment. "
                          "You can install it with pip:\n`pip install timm`.\n")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", missing)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", missing)
    for call in (lambda: skeleton(model.config), lambda: load(str(tmp_path))):
        with pytest.raises(ModelLoadError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "requires the timm library" in msg and "`pip install timm`" in msg
        assert "damaged" not in msg


def test_linear_subclasses_left_out_are_an_error_or_a_warning(caplog):
    """The general guard (no family knowledge): linears quantize_ cannot convert are counted by weight."""
    from llmq.errors import UnsupportedArchitecture

    model = tiny_llama()
    _subclass_(model, [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")])
    with pytest.raises(UnsupportedArchitecture, match=r"only 8 linear layers \(33%.*_MyLinear \(67% of the"):
        quantize_(model, Quantization(method="llm-int8"), progress=False)
    model = tiny_llama()
    _subclass_(model, ["model.layers.0.self_attn.k_proj"])  # 3% of the linear weights: converted around
    with caplog.at_level("WARNING", logger="llmq.quantize"):
        names = quantize_(model, Quantization(method="llm-int8"), progress=False)
    assert "model.layers.0.self_attn.k_proj" not in names and len(names) == 13
    assert "_MyLinear (3% of the linear weights)" in caplog.text
    assert type(model.get_submodule("model.layers.0.self_attn.k_proj")) is _MyLinear
    with pytest.raises(UnsupportedArchitecture, match="int8 already"):  # nothing float is left
        quantize_(model, Quantization(method="llm-int8", skip=("lm_head", "k_proj")), progress=False)
    with pytest.raises(UnsupportedArchitecture, match="shorten --skip"):
        linear_names(tiny_llama(), ("lm_head", "model"))


@pytest.mark.parametrize("family", ["MixtralConfig", "Qwen3MoeConfig"])
def test_fused_moe_experts_are_refused_not_left_in_float(family):
    """transformers 5 keeps MoE experts as 3-D parameters, which neither llmq nor a stock bitsandbytes reload
    can make int8: converting only attention and calling that int8 would be a silent near no-op."""
    import transformers

    from llmq.errors import UnsupportedArchitecture

    cfg = getattr(transformers, family)(hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=256, num_local_experts=4, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with pytest.raises(UnsupportedArchitecture, match=r"only 8 linear layers \(\d+%.*Experts's 3-D weights"):
        linear_names(model, ("lm_head",))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitecture):
        quantize_(model, Quantization(method="weight-only"), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half converted


def test_threshold_changes_output_on_outlier_column():
    """LLM.int8's threshold must act on CPU: an injected outlier column is computed in high precision."""
    from types import SimpleNamespace

    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    x[:, 5] = 40.0  # an outlier feature, as in LLM.int8's analysis
    outs, ref = {}, None
    for t in (0.0, 6.0):
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
        m.config = SimpleNamespace()
        with torch.no_grad():
            ref = m(x)
        quantize_(m, Quantization(method="llm-int8", threshold=t, skip=()), progress=False)
        assert m.config.quantization_config["llm_int8_threshold"] == t
        with torch.no_grad():
            outs[t] = m(x).float()
    err0, err6 = (outs[0.0] - ref).abs().mean(), (outs[6.0] - ref).abs().mean()
    assert not torch.equal(outs[0.0], outs[6.0])
    assert err6 < err0 / 2, (err0, err6)


def test_replaced_modules_keep_eval_mode():
    """bitsandbytes on CPU ignores the threshold in training mode (it dequantizes instead): the Int8
    modules must inherit the model's eval mode, or W8A8 silently becomes W8A16."""
    model = tiny_llama()
    quantize_(model, Quantization(method="smoothquant"), progress=False)
    int8 = [m for m in model.modules() if type(m).__name__ == "Linear8bitLt"]
    assert int8 and not any(m.training for m in int8)


@pytest.mark.parametrize("method", ["smoothquant", "llm-int8", "weight-only"])
def test_saved_checkpoint_reloads_with_stock_transformers(tmp_path, method):
    model, tok = tiny_llama(), tiny_tokenizer()
    report, stats = quantize_model_(model, tok, _recipe(method), windows=_windows(), progress=False)
    assert report.method == method
    assert (stats is not None) == (method != "llm-int8")  # alpha 0.5: weight-only is rescaled too
    assert (report.alphas is not None) == (method != "llm-int8")
    save_checkpoint(model, tok, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["load_in_8bit"]
    assert cfg["llm_int8_threshold"] == Quantization(method=method).effective_threshold
    ids = [[5, 9, 33, 7, 101, 200, 17, 3]]
    with torch.no_grad():
        ours = model(torch.tensor(ids)).logits
    out = tmp_path / "reload.pt"
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "q"), json.dumps(ids), str(out)], check=True)
    got = torch.load(out)
    assert "Linear8bitLt" in got["types"]
    assert torch.equal(got["logits"], ours), (got["logits"] - ours).abs().max()
    assert sorted(p.name for p in (tmp_path / "q").glob("*.bin")) == []
    # storage auto from a float32 run: float16 where the run measured the range (calibration windows ran)
    want = "bfloat16" if report.storage["value_max"] is None else "float16"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == report.storage["dtype"] == want


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_storage_dtype_is_what_stock_transformers_reloads(tmp_path, storage):
    """Every non-int8 tensor (the tied embedding, norms) is saved in the storage dtype, SCB stays float32,
    config.json records the dtype, and stock from_pretrained reproduces the in-memory model bit for bit."""
    from safetensors import safe_open

    model, tok = tiny_llama(tie_word_embeddings=True), tiny_tokenizer()
    rec = _recipe("smoothquant").override({"quantization.storage_dtype": storage})
    quantize_model_(model, tok, rec, windows=_windows(), progress=False)
    save_checkpoint(model, tok, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["dtype"] == storage
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        kinds = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in kinds.items() if k.endswith("SCB")} == {"F32"}
    want = {"float32": "F32", "float16": "F16"}[storage]
    assert {d for k, d in kinds.items() if not k.endswith(("SCB", "weight_format"))} == {"I8", want}
    ids = [[5, 9, 33, 7, 101, 200, 17, 3]]
    with torch.no_grad():
        ours = model(torch.tensor(ids)).logits
    out = tmp_path / "reload.pt"
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "q"), json.dumps(ids), str(out)], check=True)
    assert torch.equal(torch.load(out)["logits"], ours)


def test_storage_dtype_keeps_what_from_pretrained_keeps_in_fp32():
    from llmq.storage import cast_unquantized_, storage_dtype

    assert storage_dtype("auto", torch.float32) == torch.bfloat16  # range not measured
    assert storage_dtype("auto", torch.float32, 32752.0) == torch.float16  # half the float16 range
    assert storage_dtype("auto", torch.float32, 32753.0) == torch.bfloat16
    assert storage_dtype("auto", torch.float32, float("nan")) == torch.bfloat16
    assert storage_dtype("auto", torch.float16) == torch.float16
    assert storage_dtype("auto", torch.bfloat16, 1.0) == torch.bfloat16  # a 16-bit run keeps its dtype
    assert storage_dtype("float32", torch.float16) == torch.float32
    model = tiny_llama()
    quantize_(model, Quantization(), progress=False)
    model._keep_in_fp32_modules_strict = ["input_layernorm"]  # as e.g. MoE routers declare
    saved = cast_unquantized_(model, torch.bfloat16)
    kinds = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in kinds.items() if "input_layernorm" in n)
    assert kinds["model.embed_tokens.weight"] == kinds["model.norm.weight"] == torch.bfloat16
    assert {d for n, d in kinds.items() if "proj" in n} == {torch.int8}
    assert saved > 0 and model.config.dtype == torch.bfloat16


@pytest.mark.parametrize("name,kw", [
    ("OpenAIGPTConfig", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64)),  # GPT-1 blocks return lists
    ("RwkvConfig", dict(hidden_size=64, num_hidden_layers=2, attention_hidden_size=64, intermediate_size=128,
                        context_length=64)),  # the loop unpacks three values from each block
])
def test_layer_stage_runs_families_outside_the_table(name, kw):
    """llm-int8 with GPTQ runs the per-layer stage on any family: the input catcher hands the model's loop what
    it unpacks from a layer, and a layer's output may be a list."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(getattr(transformers, name)(vocab_size=V, **kw)).eval()
    ids = torch.randint(3, V - 4, (4, 16), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(calibration=Calibration(samples=4, seq_len=16), quantization=Quantization(method="llm-int8"))
    quantize_model_(model, None, recipe, windows=ids, progress=False)
    names = linear_names(AutoModelForCausalLM.from_config(model.config), ("lm_head",))
    assert names and all(type(model.get_submodule(n)).__name__ == "Linear8bitLt" for n in names)
    with torch.no_grad():
        assert torch.isfinite(model(ids[:1]).logits).all()


def _six_layers(case: str):
    from test_smooth import _cfg, _gemma4

    gemma4 = dict(num_hidden_layers=6, layer_types=["sliding_attention", "full_attention"] * 3, num_kv_shared_layers=3)
    return {
        "llama": lambda: _cfg("LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=2),
        "bloom": lambda: _cfg("BloomConfig", hidden_size=64, n_layer=6, n_head=4),
        "gpt2": lambda: _cfg("GPT2Config", n_embd=64, n_layer=6, n_head=4),
        "gemma4_text": _gemma4(**gemma4),
        "gemma4_text-k-eq-v": _gemma4(attention_k_eq_v=True, **gemma4),
        "openai-gpt": lambda: _cfg("OpenAIGPTConfig", n_embd=64, n_layer=6, n_head=4, n_positions=64),
        "rwkv": lambda: _cfg("RwkvConfig", hidden_size=64, num_hidden_layers=6, attention_hidden_size=64,
                             intermediate_size=128, context_length=64),
    }[case]()


@pytest.mark.parametrize("case", ["llama", "bloom", "gpt2", "gemma4_text", "gemma4_text-k-eq-v", "openai-gpt", "rwkv"])
def test_layer_by_layer_float_pass_equals_the_models_own(case):
    """The per-layer stage's inputs: the catcher's layer-0 inputs and per-layer extras, run layer by layer
    (Feed.advance_), give each window the very output the whole model's last layer gives. With 6 layers: BLOOM's
    loop indexes `outputs[0]`, which a bare tensor from the catcher survived for 4 layers and then crashed on
    (every GPTQ or auto run of a real BLOOM); Gemma 4's KV-shared layers read the keys and values an earlier layer
    stored for the same window."""
    from transformers import AutoModelForCausalLM

    from llmq.arch import layers_path
    from llmq.layers import Feed, catch_inputs

    cfg = _six_layers(case)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    layers = model.get_submodule(layers_path(model))
    assert len(layers) == 6
    ids = torch.randint(3, V - 4, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = []
    hook = layers[-1].register_forward_hook(lambda m, a, o: ref.append(o[0] if isinstance(o, (tuple, list)) else o))
    with torch.no_grad():
        for w in range(2):
            model(ids[w:w + 1], use_cache=False)
    hook.remove()
    hidden, extras = catch_inputs(model, layers, ids, torch.device("cpu"), torch.device("cpu"))
    for i in range(6):
        Feed(f"{layers_path(model)}.{i}", layers[i], hidden, extras[i], torch.device("cpu")).advance_()
    for ours, theirs in zip(hidden, ref, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_second_stream_between_layers_is_refused_not_replayed_stale():
    """ZAYA's layers return (hidden, router states) and each takes the previous layer's router states: the stage's
    feed carries hidden states alone, so it would replay the first window's layer-0 router states to every layer
    (a silent miscalibration: the float pass differed from the model's own by 1.8e-2). The catcher refuses."""
    import transformers
    from transformers import AutoModelForCausalLM

    from llmq.errors import UnsupportedArchitecture
    from llmq.layers import catch_inputs

    cfg = transformers.ZayaConfig(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                  num_experts_per_tok=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(3, V - 4, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedArchitecture, match="pass state to the next layer"):
        catch_inputs(model, model.model.layers, ids, torch.device("cpu"), torch.device("cpu"))


def test_unsaved_buffers_get_the_dtypes_of_a_stock_reload(tmp_path):
    """Buffers not in the checkpoint are rebuilt by from_pretrained: XGLM's sinusoidal positions in the stored
    dtype, rotary inv_freq in float32. The in-memory model gets the same, so it runs as its reload does
    (before, float16 storage left XGLM's positions float32 and its first LayerNorm raised on mixed dtypes)."""
    from transformers import AutoModelForCausalLM

    from llmq.storage import cast_unquantized_

    for case in ("xglm", "llama"):
        model, _ = _build(case)
        quantize_(model, Quantization(method="llm-int8"), progress=False)
        cast_unquantized_(model, torch.float16)
        ids = torch.randint(3, V - 4, (2, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()
        save_checkpoint(model, tiny_tokenizer(), tmp_path / case)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path / case)
        mine = {n: b.dtype for n, b in model.named_buffers() if b.is_floating_point()}
        assert mine == {n: b.dtype for n, b in stock.named_buffers() if b.is_floating_point()}
        assert torch.float16 in mine.values() if case == "xglm" else set(mine.values()) == {torch.float32}


def test_an_output_head_not_named_lm_head_stays_float(tmp_path):
    """BioGPT's head is `output_projection` (tied to the embedding): "lm_head" in skip keeps it float, as stock
    transformers keeps any output embedding, and names it in llm_int8_skip_modules for the stock reload.
    (Before, it became int8, and its tie to the embedding made the saved checkpoint inconsistent.)"""
    from transformers import AutoModelForCausalLM

    model, _ = _build("biogpt")
    names = quantize_(model, Quantization(method="llm-int8"), progress=False)
    assert "output_projection" not in names and type(model.output_projection) is torch.nn.Linear
    assert model.config.quantization_config["llm_int8_skip_modules"] == ["lm_head", "output_projection"]
    assert quantize_(_build("biogpt")[0], Quantization(method="llm-int8", skip=()), progress=False)[-1] == \
        "output_projection"  # no "lm_head" in skip: the head is converted as asked
    save_checkpoint(model, tiny_tokenizer(), tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(stock.output_projection) is torch.nn.Linear
    assert type(stock.biogpt.layers[0].fc1).__name__ == "Linear8bitLt"
    ids = torch.randint(3, V - 4, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, model(ids).logits)


def test_int8_weights_take_one_byte(tmp_path):
    from safetensors import safe_open

    model, tok = tiny_llama(), tiny_tokenizer()
    quantize_model_(model, tok, _recipe("llm-int8"), progress=False)
    save_checkpoint(model, tok, tmp_path)
    names = linear_names(tiny_llama(), ("lm_head",))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        for n in names:
            w = f.get_tensor(n + ".weight")
            assert w.dtype == torch.int8
            assert f.get_tensor(n + ".SCB").shape == (w.shape[0],)


@pytest.mark.parametrize("alpha", [0.0, 0.5, "auto"])
def test_smoothquant_alpha_modes(alpha):
    model, tok = tiny_llama(), tiny_tokenizer()
    report, _ = quantize_model_(model, tok, _recipe("smoothquant", alpha), windows=_windows(), progress=False)
    alphas = report.alphas
    assert alphas and all(k.startswith("model.layers.") for k in alphas)
    if alpha == "auto":
        assert set(alphas.values()) <= set(Smoothing().grid)
    else:
        assert set(alphas.values()) == {alpha}


def test_auto_never_worse_than_no_smoothing_on_calibration_error():
    from llmq.alpha import search_alpha_
    from llmq.calibrate import calibrate
    from llmq.smooth import smooth_targets

    model = tiny_llama()
    with torch.no_grad():  # plant outlier channels like real LLMs have
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 30.0
    targets = smooth_targets(model)
    names = sorted({n for t in targets for n in t.linear_names})
    stats = calibrate(model, _windows(), names, sample_names=tuple(t.linear_names[0] for t in targets),
                      sample_tokens=128, progress=False)
    chosen, errors = search_alpha_(model, targets, stats, Smoothing().grid, progress=False)
    for key, errs in errors.items():
        assert errs[f"{chosen[key]:g}"] <= errs["0"]
    assert any(a > 0 for a in chosen.values())  # the outliers make smoothing worth it somewhere


def test_calibration_is_running_max():
    from llmq.calibrate import calibrate

    model = tiny_llama()
    w = _windows(n=4)
    name = "model.layers.0.mlp.down_proj"
    both = calibrate(model, w, [name], progress=False).act_max[name]
    a = calibrate(model, w[:2], [name], progress=False).act_max[name]
    b = calibrate(model, w[2:], [name], progress=False).act_max[name]
    assert torch.equal(both, torch.maximum(a, b))


def test_calibration_window_mean_is_the_mean_of_per_window_maxima():
    from llmq.calibrate import calibrate

    model = tiny_llama()
    w = _windows(n=4)
    name = "model.layers.0.mlp.down_proj"
    got = calibrate(model, w, [name], statistic="window-mean", progress=False)
    each = torch.stack([calibrate(model, w[i:i + 1], [name], progress=False).act_max[name] for i in range(4)])
    assert got.statistic == "window-mean"
    torch.testing.assert_close(got.act_max[name], each.mean(0))
    assert (got.act_max[name] <= each.amax(0)).all() and (got.act_max[name] < each.amax(0)).any()


def test_window_mean_run_records_its_statistic_and_reads_no_more_than_the_max():
    """Layer 0's linears see the same inputs in both runs, so there the window mean is at most the max."""
    runs = {}
    for stat in ("max", "window-mean"):
        rec = _recipe("smoothquant").override({"calibration.statistic": stat})
        report, stats = quantize_model_(tiny_llama(), tiny_tokenizer(), rec, windows=_windows(), progress=False)
        assert stats.statistic == stat and report.calibration.statistic == stat
        runs[stat] = stats.act_max
    from llmq.calibrate import CalibrationStats

    rec = _recipe("smoothquant")  # statistic auto: the max without a guard, the --act-scales file's with one
    assert rec.calibration.statistic == "auto"
    report, stats = quantize_model_(tiny_llama(), tiny_tokenizer(), rec, windows=_windows(), progress=False)
    assert stats.statistic == report.calibration.statistic == "max"
    given = CalibrationStats(act_max=runs["window-mean"], statistic="window-mean")
    report, stats = quantize_model_(tiny_llama(), tiny_tokenizer(), rec, windows=_windows(), scales=given,
                                    progress=False)
    assert stats is given and report.calibration.statistic == "window-mean"
    first = [n for n in runs["max"] if n.startswith("model.layers.0.") and "down_proj" not in n]
    assert first
    for n in first:
        assert (runs["window-mean"][n] <= runs["max"][n]).all() and (runs["window-mean"][n] < runs["max"][n]).any()


def test_act_scales_remember_their_statistic(tmp_path):
    from llmq.calibrate import CalibrationStats, load_act_scales, save_act_scales
    from llmq.errors import ConfigError

    path = tmp_path / "wm.safetensors"
    save_act_scales(CalibrationStats(act_max={"a": torch.ones(3)}, statistic="window-mean"), path)
    assert load_act_scales(path).statistic == "window-mean"
    assert load_act_scales(path, "window-mean").statistic == "window-mean"
    with pytest.raises(ConfigError, match="holds the window-mean statistic.*calibration.statistic=window-mean"):
        load_act_scales(path, "max")
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3)}, tmp_path / "old.safetensors")  # written before the option existed
    assert load_act_scales(tmp_path / "old.safetensors", "max").statistic == "max"


def test_text_pipeline_with_tokenizer():
    """The pipeline tokenizes a real text source when no windows are passed in."""
    model, tok = tiny_llama(), tiny_tokenizer()
    tmp = __import__("tempfile").mkdtemp()
    path = f"{tmp}/calib.txt"
    open(path, "w").write(tiny_text(2000))
    rec = _recipe("smoothquant").override({"calibration.source": path})
    report, stats = quantize_model_(model, tok, rec, progress=False)
    assert stats.tokens == 8 * 32


@pytest.mark.parametrize("case", sorted(SMOOTH_CASES))
def test_every_table_family_runs_the_layer_stage_end_to_end(case):
    """Every family of llmq/arch.py through the in-memory driver's per-layer stage: W8A8 with the layer-output
    alpha search (each decoder layer run on its cached inputs, with that family's layer arguments) and GPTQ.
    Every linear but lm_head becomes int8, every smoothing group gets an alpha and the model still runs.
    (That smoothing is exact per family is test_smooth's; on these random models KL to float is ~1e-6 either
    way, so it would prove nothing here.)"""
    from llmq.smooth import smooth_targets

    model, _ = _build(case)
    ids = torch.randint(3, V - 4, (6, 24), generator=torch.Generator().manual_seed(0))
    names = linear_names(model, ("lm_head",))
    keys = {t.key for t in smooth_targets(model)}
    recipe = Recipe(calibration=Calibration(samples=6, seq_len=24),
                    smoothing=Smoothing(alpha="auto", auto_tokens=48, guard_windows=0),
                    quantization=Quantization(method="smoothquant"))
    report, _ = quantize_model_(model, None, recipe, windows=ids, progress=False)
    assert set(report.alphas) == keys and keys
    assert all(type(model.get_submodule(n)).__name__ == "Linear8bitLt" for n in names)
    with torch.no_grad():
        assert torch.isfinite(model(ids[:2]).logits).all()
