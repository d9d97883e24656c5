"""--rotate (llmq/rotate.py): the residual-stream rotation is exact in float for every family it accepts, tied
or not; it refuses the others; it lowers W8A8 error where the stream has outlier channels; and a rotated,
quantized checkpoint reloads in stock transformers as the model llmq evaluated."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama, tiny_text, tiny_tokenizer
from test_smooth import CASES, _build, _logits

from llmq.errors import UnsupportedArchitecture
from llmq.hadamard import hadamard, rotation
from llmq.rotate import ROTATABLE, rotate_, rotated_bound


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 576, 640, 896, 1536, 2560, 3584, 4096])
def test_hadamard_catalogue(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [64, 100])  # 100 = 4 x 25: no Hadamard matrix in the catalogue
def test_rotation_is_orthogonal_and_seeded(n):
    q, kind = rotation(n, seed=3)
    assert kind == ("randomized Hadamard" if n == 64 else "random orthogonal")
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, rotation(n, seed=3)[0]) and not torch.equal(q, rotation(n, seed=4)[0])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", ROTATABLE)
def test_rotation_leaves_float_logits_unchanged(case, tied):
    model, _ = _build(case)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    head.weight = emb.weight if tied else torch.nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = tied
    ref = _logits(model)
    bound, _ = rotated_bound(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = rotate_(model)
    assert (_logits(model) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    rotated = [p.abs().max().item() for n, p in model.named_parameters()
               if "norm" not in n and not torch.equal(p, before.get(n, p + 1))]  # (an untied lm_head is new)
    assert len(rotated) > 4 and max(rotated) <= bound * (1 + 1e-6)  # what auto's float16 check relies on
    assert info["untied_lm_head_params"] == (emb.weight.numel() if tied else 0)
    assert model.get_output_embeddings().weight.data_ptr() != emb.weight.data_ptr()
    gemma = case in ("gemma", "vaultgemma")  # output = norm(x) * (1 + w)
    hidden = model.config.get_text_config().hidden_size  # (per-head q/k norms, hunyuan's, are not folded)
    norms = [m for n, m in model.named_modules() if n.endswith(("layernorm", ".norm")) and m.weight.numel() == hidden]
    assert norms and all(torch.all(m.weight == (0.0 if gemma else 1.0)) for m in norms)


@pytest.mark.parametrize("case", ["llama", "phi3", "qwen2"])  # separate v_proj, fused qkv_proj, v bias
def test_each_heads_values_are_rotated_by_one_hadamard(case):
    """R2: v_proj's output for every head becomes v H, H = rotation(head_dim, seed + 1), and o_proj undoes it."""
    from llmq.rotate import _head_dim, _heads

    model, _ = _build(case)
    v_name, (lo, hi), _ = _heads(model)[0]
    seen = []
    model.get_submodule(v_name).register_forward_hook(lambda m, a, out: seen.append(out[..., lo:hi].detach()))
    _logits(model)
    rotate_(model, seed=5)
    _logits(model)
    d = _head_dim(model)
    h = rotation(d, 6)[0].float()
    before, after = (x.reshape(*x.shape[:-1], -1, d) for x in seen)
    assert (before - after).abs().max() > 0.1 * before.abs().max()  # not the identity
    assert torch.allclose(before @ h, after, atol=1e-5 * before.abs().max().item())


@pytest.mark.parametrize("case", sorted(set(CASES) - set(ROTATABLE)))
def test_families_without_an_exact_fold_are_refused(case):
    model, _ = _build(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitecture, match="--rotate supports"):
        rotate_(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layer_missing_from_the_table_is_refused_not_half_rotated(monkeypatch):
    import llmq.rotate as rot

    model, _ = _build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = rot.smooth_targets
    monkeypatch.setattr(rot, "smooth_targets", lambda m: [t for t in full(m) if t.key != "model.layers.1.v_o"])
    with pytest.raises(UnsupportedArchitecture, match="in every layer"):
        rotate_(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _stream_readers_error(model, ids) -> float:
    """Mean relative W8A8 error (bitsandbytes' scheme: per-token activations, per-row weights) of the outputs
    of the linears that read the residual stream (q/k/v, gate/up), on their real inputs."""
    from llmq.fakequant import fq

    errs, hooks = [], []

    def hook(mod, args):
        x, w = args[0].double(), mod.weight.double()
        exact = x @ w.T
        errs.append(((fq(x, -1) @ fq(w, -1).T - exact).norm() / exact.norm()).item())

    for n, m in model.named_modules():
        if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return sum(errs) / len(errs)


def test_rotation_lowers_w8a8_error_when_the_stream_has_outlier_channels():
    """Two residual channels 30x the rest (as real models have): per-token int8 gives the other channels few
    levels; rotated, the same model (identical float logits) spreads the outliers over every channel."""
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    err = {}
    for rotate in (False, True):
        model = tiny_llama(hidden_size=128, num_attention_heads=4)
        with torch.no_grad():
            model.model.embed_tokens.weight[:, [5, 77]] *= 30
            for layer in model.model.layers:  # and the norms pass them on, as trained norms do
                layer.input_layernorm.weight[[5, 77]] *= 10
                layer.post_attention_layernorm.weight[[5, 77]] *= 10
        if rotate:
            rotate_(model)
        err[rotate] = _stream_readers_error(model, ids)
    assert err[True] < 0.5 * err[False]


def _tiny_run(tmp_path, alpha):
    from llmq.config import Recipe
    from llmq.run import run

    src = tmp_path / "tiny"
    tiny_llama(tie_word_embeddings=True).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    text = tmp_path / "cal.txt"
    text.write_text(tiny_text(3000))
    recipe = Recipe.from_dict({"model": str(src), "device": "cpu", "smoothing": {"alpha": alpha},
                               "calibration": {"source": str(text), "samples": 4, "seq_len": 32},
                               "quantization": {"rotate": True}})
    return src, run(recipe, tmp_path / "q", progress=False)


def test_act_scales_remember_whether_they_were_rotated(tmp_path):
    from llmq.calibrate import CalibrationStats, load_act_scales, save_act_scales
    from llmq.config import Recipe
    from llmq.errors import ConfigError
    from llmq.run import run

    src, _ = _tiny_run(tmp_path, 0.5)
    scales = tmp_path / "q" / "act_scales.safetensors"
    assert load_act_scales(scales).rotated
    save_act_scales(CalibrationStats(act_max={"a": torch.ones(3)}), tmp_path / "plain.safetensors")
    assert not load_act_scales(tmp_path / "plain.safetensors").rotated
    from safetensors.torch import save_file

    save_file({"a": torch.ones(3)}, tmp_path / "old.safetensors")  # written before the metadata existed
    assert not load_act_scales(tmp_path / "old.safetensors").rotated
    save_file({"a": torch.ones(3)}, tmp_path / "r1.safetensors", metadata={"llmq_rotated": "1"})  # R1 only
    with pytest.raises(ConfigError, match="each head's values unrotated.*recalibrate without --act-scales"):
        load_act_scales(tmp_path / "r1.safetensors")
    unrotated = Recipe.from_dict({"model": str(src), "smoothing": {"alpha": 0.5},
                                  "quantization": {"rotate": False},
                                  "calibration": {"source": str(tmp_path / "cal.txt"), "act_scales": str(scales)}})
    with pytest.raises(ConfigError, match="measured with --rotate and this run is without it"):
        run(unrotated, tmp_path / "q2", progress=False)
    assert not (tmp_path / "q2").exists()
    from llmq.load import load
    from llmq.run import quantize_model_

    model, tok = load(str(src), dtype="float32", device="cpu")  # the library's unguarded path, rotate: auto
    follows = Recipe.from_dict({"model": str(src), "smoothing": {"alpha": 0.5},
                                "calibration": {"source": str(tmp_path / "cal.txt"), "samples": 4, "seq_len": 32,
                                                "act_scales": str(scales)}})
    report, _ = quantize_model_(model, tok, follows, progress=False)
    assert report.rotation is not None  # auto follows the basis of the recipe's --act-scales file


def test_rotated_checkpoint_reloads_in_stock_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    src, report = _tiny_run(tmp_path, 0.5)
    assert report.rotation["kind"] == "randomized Hadamard" and report.rotation["size"] == 64
    assert report.rotation["untied_lm_head_params"] == 256 * 64
    assert json.loads((tmp_path / "q" / "llmq_report.json").read_text())["rotation"] == report.rotation
    assert "rotated by a 64 x 64 randomized Hadamard matrix" in (tmp_path / "q" / "README.md").read_text()
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    fp = AutoModelForCausalLM.from_pretrained(src)
    assert q.config.tie_word_embeddings is False
    assert q.lm_head.weight.data_ptr() != q.model.embed_tokens.weight.data_ptr()
    assert type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    ids = torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = q(input_ids=ids).logits.float(), fp(input_ids=ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


def test_guard_checks_auto_with_rotation_against_auto_without(tmp_path):
    """The guard's rivals include the unrotated auto run; what ships is the candidate with the lowest held-out
    KL, and the checkpoint and report say whether it is rotated."""
    _, report = _tiny_run(tmp_path, "auto")
    cand = report.guard["candidates"]
    first = {"auto", "alpha 0", "family alpha 0.85", "auto, no rotation", "auto, window mean"}
    assert set(cand) - first == {f"{min(first, key=lambda k: cand[k]['kl_divergence'])}, equal GPTQ weights"}
    assert report.guard["chosen"] == min(cand, key=lambda k: cand[k]["kl_divergence"])
    rotated = not report.guard["chosen"].startswith("auto, no rotation")
    assert (report.rotation is not None) == rotated
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg.get("tie_word_embeddings", True) is not rotated


def _auto(model_type="llama", tied=False, **recipe):
    from llmq.config import Recipe
    from llmq.rotate import auto_rotate

    model = _build(model_type)[0] if model_type != "llama" else tiny_llama(tie_word_embeddings=tied)
    return auto_rotate(model, Recipe.from_dict(recipe))


def test_auto_rotates_only_where_it_is_free_and_guarded():
    """rotate: auto (the default) is on for an untied, rotatable model under --alpha auto with its guard;
    every other case is off, with the reason."""
    from llmq.calibrate import CalibrationStats
    from llmq.config import Recipe
    from llmq.rotate import auto_rotate

    assert Recipe().quantization.rotate == "auto"
    assert _auto() == (True, "untied lm_head, so no extra bytes; the guard compares it with the unrotated model")
    assert _auto(quantization={"method": "weight-only"})[0]
    big = tiny_llama().half()
    with torch.no_grad():  # the final norm's multipliers fold into lm_head: rows of 2-norm above 65504
        big.model.norm.weight.fill_(3e4)
        big.lm_head.weight.mul_(20)
    off = {
        "tied": _auto(tied=True),
        "llm-int8": _auto(quantization={"method": "llm-int8"}),
        "fixed alpha": _auto(smoothing={"alpha": 0.5}),
        "no guard": _auto(smoothing={"guard_windows": 0}),
        "gpt2": _auto("gpt2"),
        "float16 overflow": auto_rotate(big, Recipe()),
    }
    assert not any(on for on, _ in off.values())
    assert "tied to the embedding" in off["tied"][1] and "--rotate asks" in off["tied"][1]
    assert "not measured with llm-int8" in off["llm-int8"][1]
    assert "--alpha auto and its guard" in off["fixed alpha"][1] == off["no guard"][1]
    assert "gpt2 has no exact fold" in off["gpt2"][1]
    over = off["float16 overflow"][1]
    assert "float16 could overflow" in over and "in lm_head, above 65504" in over
    half = auto_rotate(tiny_llama().half(), Recipe())  # the folded weights provably fit float16
    assert half[0] and "float16 cannot overflow" in half[1]
    for rotated in (True, False):  # --act-scales decide: the maxima belong to one basis
        got = auto_rotate(tiny_llama(tie_word_embeddings=True), Recipe(), CalibrationStats({}, rotated=rotated))
        assert got[0] is rotated and "--act-scales were measured" in got[1]


def test_rotate_must_be_true_false_or_auto():
    from llmq.config import Recipe
    from llmq.errors import ConfigError

    with pytest.raises(ConfigError, match="quantization.rotate .* must be true, false or auto, got 'yes'"):
        Recipe.from_dict({"quantization": {"rotate": "yes"}})


def test_cli_rotate_flags():
    from llmq.args import build_parser, recipe_from_args

    parse = build_parser().parse_args
    got = [recipe_from_args(parse(["quantize", "m", "--out", "o", *f])).quantization.rotate
           for f in ([], ["--rotate"], ["--no-rotate"])]
    assert got == ["auto", True, False]


def test_card_says_when_auto_chose_the_rotation():
    from llmq.card import _rotation
    from llmq.report import Report

    r = {"kind": "randomized Hadamard", "size": 64, "seed": 0, "untied_lm_head_params": 0}
    assert "rotate: auto" not in _rotation(Report("smoothquant", 0.0, rotation=r))
    assert "llmq's default choice (rotate: auto): untied lm_head." in _rotation(
        Report("smoothquant", 0.0, rotation={**r, "auto": "untied lm_head"}))
    assert "R2" not in _rotation(Report("smoothquant", 0.0, rotation=r))  # a report from before R2
    assert "each attention head's values by a 16 x 16 one (R2" in _rotation(
        Report("smoothquant", 0.0, rotation={**r, "head_dim": 16}))


def test_default_recipe_rotates_an_untied_model_and_the_guard_checks_it(tmp_path):
    """The default (rotate auto) on an untied llama: rotated, the unrotated auto run is the guard's rival, and the
    report says auto chose it; the same model tied is not rotated and has no such rival."""
    from llmq.config import Recipe
    from llmq.run import run

    text = tmp_path / "cal.txt"
    text.write_text(tiny_text(3000))
    for tied in (False, True):
        src = tmp_path / f"tiny-{tied}"
        tiny_llama(tie_word_embeddings=tied).save_pretrained(src)
        tiny_tokenizer().save_pretrained(src)
        recipe = Recipe.from_dict({"model": str(src), "device": "cpu",
                                   "calibration": {"source": str(text), "samples": 4, "seq_len": 32}})
        report = run(recipe, tmp_path / f"q-{tied}", progress=False)
        cand = report.guard["candidates"]
        assert ("auto, no rotation" in cand) is not tied
        assert "auto, window mean" in cand and report.refined is None  # refine auto: off beside that rival
        rotated = not tied and not report.guard["chosen"].startswith("auto, no rotation")
        assert (report.rotation is not None) is rotated
        if rotated:
            assert report.rotation["auto"].startswith("untied lm_head") and report.rotation["size"] == 64
            assert "llmq's default choice (rotate: auto): untied lm_head" in (tmp_path / "q-False" / "README.md"
                                                                               ).read_text()
