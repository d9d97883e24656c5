"""quantization.a16 (llmq/a16.py): chosen linears W8A16 inside a W8A8 checkpoint, through one threshold."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from test_quantize import RELOAD, _windows

from llmq.a16 import A16_MAX, W8A8_MAX, layout_, layout_targets
from llmq.config import A16_THRESHOLD, Calibration, Quantization, Recipe, Smoothing
from llmq.errors import ConfigError
from llmq.quantize import linear_names
from llmq.run import quantize_model_
from llmq.save import save_checkpoint


def _model():
    """A tiny llama whose norms put some inputs above W8A8_MAX and whose weights are large enough for the a16
    scale not to be capped by the float16 weight step (llmq/a16.py MIN_WEIGHT_STEP)."""
    model = tiny_llama(initializer_range=0.2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight"):
                p[::5] *= 8
    return model


def _recipe(a16=("down_proj",), alpha=0.5):
    return Recipe(calibration=Calibration(samples=8, seq_len=32),
                  smoothing=Smoothing(alpha=alpha, auto_tokens=64, guard_windows=0),
                  quantization=Quantization(a16=a16))


def _inputs(model, ids) -> dict[str, torch.Tensor]:
    import bitsandbytes as bnb

    seen, handles = {}, []
    for n, m in model.named_modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            handles.append(m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach().abs())))
    with torch.no_grad():
        out = model(ids).logits
    for h in handles:
        h.remove()
    return seen, out


def test_layout_is_exact_in_float():
    """The power-of-two rescaling leaves the float32 model's logits unchanged; W8A8 groups above W8A8_MAX are
    scaled down, the a16 group up."""
    model = _model()
    ids = _windows()
    with torch.no_grad():
        before = model(ids).logits
    targets, a16 = layout_targets(model, linear_names(model, ("lm_head",)), ("down_proj",))
    assert a16 == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    done = layout_(model, targets, a16, ids)
    assert all(done[k] > 0 for k in done if k.endswith("up_down")) and "model.layers.0.up_down" in done
    assert any(v < 0 for k, v in done.items() if k.endswith((".attn", ".mlp")))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_a16_build_routes_each_linear_to_its_side_and_reloads_stock(tmp_path):
    """Every Int8 module gets the one threshold; on the calibration windows the W8A8 linears' inputs stay
    under it and down_proj's lie far above it (W8A16); down_proj as W8A16 is closer to the float model than
    all-W8A8; a stock reload computes the same logits."""
    fp, model, plain, tok = _model(), _model(), _model(), tiny_tokenizer()
    rep, _ = quantize_model_(model, tok, _recipe(), windows=_windows(), progress=False)
    quantize_model_(plain, tok, _recipe(()), windows=_windows(), progress=False)
    assert rep.threshold == A16_THRESHOLD and rep.a16["count"] == 2 and rep.a16["modules"] == ["down_proj"]
    ids = _windows()
    seen, out = _inputs(model, ids)
    assert all(m.state.threshold == A16_THRESHOLD for m in model.modules() if hasattr(m, "state"))
    for n, x in seen.items():
        if n.endswith("down_proj"):
            cols = x.reshape(-1, x.shape[-1]).amax(0) >= A16_THRESHOLD  # bitsandbytes routes whole columns
            assert x.max() <= A16_MAX and cols.float().mean() > 0.9, (n, x.max(), cols.float().mean())
        elif not n.endswith("o_proj"):  # fed by a norm, rescaled under W8A8_MAX
            assert x.max() < A16_THRESHOLD and x.max() <= W8A8_MAX * 1.5, (n, x.max())
    with torch.no_grad():
        ref, w8a8 = fp(ids).logits, plain(ids).logits
    assert (out - ref).pow(2).mean() < (w8a8 - ref).pow(2).mean()

    save_checkpoint(model, tok, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["llm_int8_threshold"] == A16_THRESHOLD
    probe = [[5, 9, 33, 7, 101, 200, 17, 3]]
    with torch.no_grad():
        ours = model(torch.tensor(probe)).logits
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "q"), json.dumps(probe), str(tmp_path / "r.pt")],
                   check=True)
    assert torch.equal(torch.load(tmp_path / "r.pt")["logits"], ours)


def test_a16_search_models_the_float_inputs(monkeypatch):
    """Auto alpha: the search simulates the a16 linears weight-only (their inputs untouched)."""
    import llmq.fakequant

    modes = []
    real = llmq.fakequant.simulate_

    def spy(model, mode, names, amax=None):
        modes.append((mode.act, tuple(n.rsplit(".", 1)[-1] for n in names)))
        return real(model, mode, names, amax)

    monkeypatch.setattr(llmq.fakequant, "simulate_", spy)
    quantize_model_(_model(), tiny_tokenizer(), _recipe(alpha="auto"), windows=_windows(), progress=False)
    assert modes and all(names == ("down_proj",) for act, names in modes if act == "none")
    assert all("down_proj" not in names for act, names in modes if act == "token")
    assert ("none", ("down_proj",)) in modes


@pytest.mark.parametrize("kw,match", [
    (dict(method="weight-only", a16=("down_proj",)), "needs --method smoothquant"),
    (dict(method="llm-int8", a16=("down_proj",)), "needs --method smoothquant"),
    (dict(a16=("down_proj",), threshold=4.0), "leave quantization.threshold"),
    (dict(a16=("",)), "module names or suffixes"),
])
def test_a16_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        Quantization(**kw)


@pytest.mark.parametrize("a16,match", [
    (("q_proj",), "but not the other linears fed by"),
    (("down_prj",), "matches no linear"),
    (("lm_head",), "matches no linear"),
])
def test_a16_needs_whole_rescalable_groups(a16, match):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=match):
        layout_targets(model, linear_names(model, ("lm_head",)), a16)


def test_a16_refuses_a_linear_no_group_feeds_alone():
    """GPT-2's MLP output projection follows a GELU: no exact rescaling reaches its input."""
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match="cannot be rescaled exactly"):
        layout_targets(model, linear_names(model, ("lm_head",)), ("mlp.c_proj",))
    assert layout_targets(model, linear_names(model, ("lm_head",)), ())[1] == set()


def test_cli_a16_flag_and_card():
    from llmq.args import build_parser, recipe_from_args
    from llmq.card import _method
    from llmq.report import Report

    a = build_parser().parse_args(["quantize", "m", "--out", "o", "--a16", "down_proj", "--a16", "down_proj"])
    assert recipe_from_args(a).quantization.a16 == ("down_proj",)
    rep = Report(method="smoothquant", threshold=8.0, a16={"modules": ["down_proj"], "threshold": 8.0, "count": 30})
    text = _method(rep, "smoothquant")
    assert "every matmul is int8 x int8" not in text and "`down_proj` (30 of them)" in text
    assert "every matmul is int8 x int8" in _method(Report(method="smoothquant", threshold=0.0), "smoothquant")


def test_scales_are_powers_of_two_within_float16():
    """W8A8 inputs go under W8A8_MAX unless that would push the consumers' weights past float16 / 4; a16 inputs
    go up to A16_MAX unless the float16 weight step or the feeding weights say less; all powers of two."""
    from llmq.a16 import scale_for

    model = tiny_llama()
    targets, a16 = layout_targets(model, linear_names(model, ("lm_head",)), ("down_proj",))
    attn = next(t for t in targets if t.key == "model.layers.0.attn")
    up_down = next(t for t in targets if t.key == "model.layers.0.up_down")
    assert scale_for(model, attn, a16, {attn.key: 64.0}) == 2.0**-4  # 64 -> W8A8_MAX
    assert scale_for(model, attn, a16, {attn.key: 3.0}) == scale_for(model, attn, a16, {}) == 1.0
    top = {up_down.key: 2.0**-20, up_down.prev_name: 2.0**-21}
    free = scale_for(model, up_down, a16, top)  # A16_MAX / 2^-20 = 2^31, capped by down_proj's weight step
    assert 1 < free < 2.0**31 and free == 2.0 ** round(torch.tensor(free).log2().item())
    assert scale_for(model, up_down, a16, {up_down.key: 1.0}) == min(free, A16_MAX)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 5000.0
        model.model.layers[0].mlp.up_proj.weight[0, 0] = 5000.0
    assert scale_for(model, attn, a16, {attn.key: 64.0}) == 0.5  # q_proj's weights x2 at most (<= 16376)
    assert scale_for(model, up_down, a16, top) == 2.0  # up_proj's likewise


def test_an_a16_group_the_caps_keep_under_the_threshold_is_named(caplog, monkeypatch):
    """Where a cap leaves an a16 group's input under T, its linears stay W8A8: the log says so, naming the group.
    A weight-step floor of 1 makes the float16 weight-step cap bind; with the real floor _model's inputs reach T."""
    import logging

    ids = _windows()

    def warned() -> list[str]:
        model = _model()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llmq.a16"):
            layout_(model, *layout_targets(model, linear_names(model, ("lm_head",)), ("down_proj",)), ids)
        return [r.getMessage() for r in caplog.records if "stay W8A8" in r.getMessage()]

    assert not warned()
    monkeypatch.setattr("llmq.a16.MIN_WEIGHT_STEP", 1.0)
    msgs = warned()
    assert len(msgs) == 2 and all("up_down" in w and f"threshold {A16_THRESHOLD:g}" in w for w in msgs)
