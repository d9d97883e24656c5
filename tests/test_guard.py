"""--alpha auto: the layer-output search and the end-to-end guard (llmq/alpha.py, llmq/guard.py)."""

import copy
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_llama, tiny_text
from test_sequential import _fp_folder

from llmq.arch import ARCHS
from llmq.calibrate import calibrate
from llmq.config import GROUPS, Calibration, Quantization, Recipe, Smoothing
from llmq.guard import rivals, split_windows
from llmq.layers import Feed, catch_inputs
from llmq.quantize import linear_names
from llmq.run import run
from llmq.smooth import smooth_targets

ROOT = Path(__file__).resolve().parents[1]


def test_family_alpha_table_matches_configs():
    for family, arch in ARCHS.items():
        path = ROOT / "configs" / f"{family}.yaml"
        if path.exists():
            assert yaml.safe_load(path.read_text())["smoothing"]["alpha"] == arch.alpha, family


def test_sink_rival_flips_gptqs_first_position_weighting():
    from llmq.guard import sink_rival

    rec = Recipe()
    name, flip = sink_rival(rec)
    assert (name, flip.quantization.gptq_sink, rec.quantization.gptq_sink) == ("equal GPTQ weights", False, True)
    assert flip.override({"quantization.gptq_sink": True}) == rec  # nothing else changed
    assert sink_rival(flip)[0] == "GPTQ sink weighted" and sink_rival(flip)[1].quantization.gptq_sink
    assert sink_rival(rec.override({"quantization.gptq": False})) is None  # round-to-nearest: nothing to flip


def test_split_windows_is_disjoint_and_spread():
    w = torch.arange(10)[:, None].expand(10, 4)
    cal, held = split_windows(w, 3)
    assert cal.shape == (7, 4) and held.shape == (3, 4)
    assert sorted(cal[:, 0].tolist() + held[:, 0].tolist()) == list(range(10))
    assert held[:, 0].tolist() == [0, 4, 9] or held[:, 0].tolist() == [0, 5, 9]
    same, none = split_windows(w, 0)
    assert same is w and none.shape[0] == 0


def test_rivals_are_alpha_zero_and_the_family_alpha():
    r = rivals(Recipe().override({"quantization.rotate": False}), "llama")  # as resolve_rotate leaves it
    assert [x.smoothing.alpha for x in r.values()] == [0.0, 0.85]
    assert [x.smoothing.alpha for x in rivals(Recipe(), "not-a-family").values()] == [0.0]
    assert all(x.quantization.rotate is False for x in r.values())


def test_with_rotate_the_unrotated_auto_run_is_a_rival():
    from dataclasses import replace

    rec = replace(Recipe(), quantization=replace(Recipe().quantization, rotate=True))
    r = rivals(rec, "llama")
    assert list(r) == ["alpha 0", "family alpha 0.85", "auto, no rotation"]
    assert [x.quantization.rotate for x in r.values()] == [True, True, False]
    assert r["auto, no rotation"].smoothing.alpha == "auto"


def test_statistic_auto_makes_the_window_mean_a_rival():
    """calibration.statistic auto (the default) builds with the max (llmq.calibrate.resolve_statistic) and the
    guard also builds auto under the window mean; a statistic the user chose is not second-guessed."""
    from llmq.calibrate import CalibrationStats, resolve_statistic

    rec = Recipe().override({"quantization.rotate": False})
    assert rec.calibration.statistic == "auto"
    built = resolve_statistic(rec, None)
    assert built.calibration.statistic == "max"
    wm = CalibrationStats(act_max={}, statistic="window-mean")
    assert resolve_statistic(rec, wm).calibration.statistic == "window-mean"  # --act-scales: the file's
    assert resolve_statistic(rec.override({"calibration.statistic": "max"}), wm).calibration.statistic == "max"
    r = rivals(built, "llama", window_mean=True)
    assert list(r) == ["alpha 0", "family alpha 0.85", "auto, window mean"]
    assert r["auto, window mean"].smoothing.alpha == "auto"
    assert [x.calibration.statistic for x in r.values()] == ["max", "max", "window-mean"]
    assert "auto, window mean" not in rivals(built, "llama")  # max asked, or auto with --act-scales
    chose = resolve_statistic(rec.override({"calibration.statistic": "window-mean"}), None)
    assert list(rivals(chose, "llama", window_mean=True)) == ["alpha 0", "family alpha 0.85"]


def test_weight_only_rivals_are_alpha_zero_only():
    """The family alphas are SmoothQuant's W8A8 values; weight-only scaling is checked against no scaling."""
    rec = Recipe().override({"quantization.method": "weight-only"})
    assert list(rivals(rec, "llama")) == ["alpha 0"]
    assert list(rivals(rec.override({"quantization.rotate": True}), "llama")) == ["alpha 0", "auto, no rotation"]


def test_which_runs_rescale_and_how_the_search_simulates_them():
    from llmq.stage import needs_windows, simulated_act, smooths

    def rec(method, alpha="auto", gptq=False):
        return Recipe().override({"quantization.method": method, "smoothing.alpha": alpha, "quantization.gptq": gptq})

    assert smooths(rec("smoothquant")) and smooths(rec("smoothquant", 0.0))  # alpha 0's alphas are reported
    assert smooths(rec("weight-only")) and smooths(rec("weight-only", 0.5))
    assert not smooths(rec("weight-only", 0.0)) and not smooths(rec("llm-int8"))
    assert needs_windows(rec("weight-only")) and not needs_windows(rec("weight-only", 0.0))
    assert not needs_windows(rec("llm-int8"))
    assert simulated_act(rec("weight-only")) == "none" and simulated_act(rec("smoothquant")) == "token"


def test_weight_only_error_leaves_the_input_float():
    from llmq.alpha import group_error, w8a8_error, weight_only_error
    from llmq.fakequant import fq

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 16, generator=g), torch.randn(8, 16, generator=g)
    x[:, 3] *= 50.0  # a large input channel: its weight column matters most
    ref, one = x @ w.t(), torch.ones(16)
    assert weight_only_error(x, w, one, ref) == pytest.approx(float((x @ fq(w, -1).t() - ref).pow(2).sum()))
    s = one.clone()
    s[3] = 4.0  # that column 4x larger before rounding (still under the row maxima): a finer grid for it
    assert weight_only_error(x, w, s, ref) < weight_only_error(x, w, one, ref)
    assert group_error("none") is weight_only_error and group_error("token") is w8a8_error


@pytest.mark.parametrize("error", ["w8a8_error", "weight_only_error"])
def test_group_errors_in_pieces_equal_the_whole(error, monkeypatch):
    import llmq.alpha

    g = torch.Generator().manual_seed(0)
    x, w, s = torch.randn(64, 16, generator=g), torch.randn(23, 16, generator=g), torch.rand(16, generator=g) + 0.5
    x[:, 3] *= 50.0
    ref = x @ w.t()
    fn = getattr(llmq.alpha, error)
    whole = fn(x, w, s, ref)
    monkeypatch.setattr("llmq.alpha.PIECE", 5 * 16)  # 5 rows a piece, the last one 3
    assert fn(x, w, s, ref) == pytest.approx(whole, rel=1e-5) and whole > 0


def _layer_feed(model, windows):
    layers = model.model.layers
    hidden, extras = catch_inputs(model, layers, windows, torch.device("cpu"), torch.device("cpu"))
    return Feed("model.layers.0", layers[0], hidden, extras[0], torch.device("cpu"))


def test_layer_error_is_per_token_relative():
    """Scaling one token's hidden state (and its error) by 1000, as an attention sink does, leaves the score
    unchanged; a plain squared error would be 10^6 times that token's."""
    from llmq.alpha import layer_error

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 6, 16, generator=g)
    out = ref + 0.01 * torch.randn(1, 6, 16, generator=g)
    k = torch.ones(1, 6, 1)
    k[0, 0] = 1000.0
    assert layer_error(out * k, ref * k) == pytest.approx(layer_error(out, ref), rel=1e-5)
    per_token = ((out - ref).pow(2).sum(-1) / ref.pow(2).sum(-1)).sum()
    assert layer_error(out, ref) == pytest.approx(float(per_token), rel=1e-6)


def _spiky_group(channels=32, rows=256, out=24):
    """A one-linear group whose inputs have per-token spikes in a few channels, and its target."""
    from llmq.smooth import SmoothTarget

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, channels, generator=g)
    x[torch.arange(rows), torch.randint(0, 4, (rows,), generator=g)] *= 40.0  # changing spike channels
    x[:, 7] = 0.0  # a dead channel
    w = torch.randn(out, channels, generator=g)
    t = SmoothTarget(key="l.0.up_down", group="up_down", prev_name="l.0.up", linear_names=("l.0.down",),
                     prev_kind="linear", channels=channels)
    return x, w, t


def test_refine_auto_where_no_window_mean_rival():
    """smoothing.refine auto (the default): every group for a W8A8 auto build under the maximum when the guard
    builds no window-mean rival (llmq/alpha.py resolve_refine; measured in docs/benchmarks.md), else none."""
    from llmq.alpha import resolve_refine
    from llmq.errors import ConfigError

    assert Smoothing().refine == "auto" and Smoothing(refine=" AUTO").refine == "auto"
    rec = Recipe().override({"calibration.statistic": "max"})
    assert resolve_refine(rec, False).smoothing.refine == GROUPS  # --sequential, guard_windows 0, statistic max
    assert resolve_refine(rec.override({"smoothing.groups": ["mlp"]}), False).smoothing.refine == ("mlp",)
    assert resolve_refine(rec, True).smoothing.refine == ()  # the guard's window-mean rival does the same job
    for off in ({"calibration.statistic": "window-mean"}, {"smoothing.alpha": 0.5},
                {"quantization.method": "weight-only"}):
        assert resolve_refine(rec.override(off), False).smoothing.refine == (), off
    given = rec.override({"smoothing.refine": ["up_down", "attn"]})
    assert given.smoothing.refine == ("up_down", "attn") and resolve_refine(given, True) is given
    assert resolve_refine(rec.override({"smoothing.refine": []}), False).smoothing.refine == ()
    with pytest.raises(ConfigError, match=r"smoothing.refine has unknown \['down'\]"):
        Smoothing(refine=("down",))
    with pytest.raises(ConfigError, match="smoothing.refine must be auto or a list of groups"):
        Recipe().override({"smoothing.refine": "all"})


@pytest.mark.parametrize("act", ["token", "none"])
def test_refine_scales_lowers_the_groups_simulated_error(act, monkeypatch):
    """The per-channel scales beat the start on the exact (not straight-through) error, which they report;
    they stay within the bound, and a channel calibration never saw (live False) keeps scale 1. Fitted on
    pieces of w's rows (bounded memory), they are the same."""
    from llmq.alpha import REFINE_BOUND, refine_scales, token_errors
    from llmq.fakequant import fq

    x, w, t = _spiky_group()
    live = x.abs().amax(0) > 0

    def err(r):
        xi = x / r
        return float(token_errors((xi if act == "none" else fq(xi, dim=-1)) @ fq(w * r, dim=-1).t(), x @ w.t()).mean())

    r, ratio = refine_scales(x, w, t, act, live=live)
    assert r is not None and r.shape == (t.channels,)
    assert ratio < 1.0 and err(r) == pytest.approx(ratio * err(torch.ones(t.channels)), rel=1e-4)
    assert float(r[7]) == 1.0 and bool(((r >= 1 / REFINE_BOUND) & (r <= REFINE_BOUND)).all())
    assert refine_scales(torch.zeros_like(x), w, t, act) == (None, 1.0)  # nothing to fit
    r, ratio = refine_scales(x, w, t, act, steps=2, live=live)  # (later steps amplify float noise: rounding)
    monkeypatch.setattr("llmq.alpha.PIECE", 5 * t.channels)  # w's rows 5 at a time: the same steps
    r5, ratio5 = refine_scales(x, w, t, act, steps=2, live=live)
    assert r is not None and torch.allclose(r5, r, rtol=1e-5) and ratio5 == pytest.approx(ratio, rel=1e-5)


@pytest.mark.parametrize("act", ["token", "none"])  # W8A8, weight-only
@torch.no_grad()
def test_layer_search_never_worse_than_alpha_zero_on_the_layer_output(act):
    from llmq.alpha import layer_error, search_layer_alpha_
    from llmq.fakequant import SimMode, simulate_
    from llmq.smooth import smooth_target_

    m = tiny_llama()
    with torch.no_grad():
        m.model.layers[0].input_layernorm.weight[5] = 30.0  # an outlier channel
    windows = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    feed = _layer_feed(m, windows)
    targets = [t for t in smooth_targets(m) if t.key.startswith("model.layers.0.")]
    qnames = [n for n in linear_names(m, ("lm_head",)) if n.startswith("model.layers.0.")]
    ids, _ = Feed.ids(4, 32)
    stats = calibrate(feed, ids, sorted({n for t in targets for n in t.linear_names}),
                      sample_names=tuple(t.linear_names[0] for t in targets), sample_tokens=64, progress=False)
    ref = feed.output(0)
    base = copy.deepcopy(m.model.layers[0].state_dict())

    def err(alphas):
        m.model.layers[0].load_state_dict(base)
        for t in targets:
            smooth_target_(feed, t, stats.act_max, alphas[t.key])
        hs = simulate_(feed, SimMode(act, "channel"), qnames)
        e = layer_error(feed.output(0).float(), ref.float())
        for h in hs:
            h.remove()
        return e

    chosen, errors, refined = search_layer_alpha_(feed, targets, qnames, stats, (0.0, 0.3, 0.6, 0.9), act=act)
    assert refined == {}  # refine=(): the alphas alone
    after = {k: v.clone() for k, v in m.model.layers[0].state_dict().items()}
    assert set(chosen) == {t.key for t in targets}
    assert err(chosen) <= err(dict.fromkeys(chosen, 0.0))
    assert err(chosen) == pytest.approx(min(errors[targets[-1].key].values()))
    m.model.layers[0].load_state_dict(base)  # the search left the chosen smoothing applied
    for t in targets:
        smooth_target_(feed, t, stats.act_max, chosen[t.key])
    assert all(torch.equal(after[k], v) for k, v in m.model.layers[0].state_dict().items())

    # with every group refined: the same alphas, and refinement kept only where the layer's error fell
    m.model.layers[0].load_state_dict(base)
    again, _, refined = search_layer_alpha_(feed, targets, qnames, stats, (0.0, 0.3, 0.6, 0.9), act=act,
                                            refine=("attn", "mlp", "v_o", "up_down"))
    assert again == chosen and set(refined) <= {t.key for t in targets}
    assert all(0 < v < 1 for v in refined.values())
    state = copy.deepcopy(m.model.layers[0].state_dict())
    hs = simulate_(feed, SimMode(act, "channel"), qnames)
    e_now = layer_error(feed.output(0).float(), ref.float())
    for h in hs:
        h.remove()
    m.model.layers[0].load_state_dict(state)
    assert e_now <= err(chosen) * (1 + 1e-6)
    assert (e_now < err(chosen)) == bool(refined)
    m.model.layers[0].load_state_dict(state)
    assert torch.allclose(feed.output(0), ref, rtol=1e-4, atol=1e-4)  # float: any smoothing is exact


def test_run_auto_ships_the_lowest_held_out_kl(tmp_path, caplog):
    fp = _fp_folder(tmp_path, "llama")
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(4000))
    recipe = Recipe(model=str(fp), calibration=Calibration(source=str(text), samples=6, seq_len=32),
                    smoothing=Smoothing(alpha="auto", auto_tokens=64, guard_windows=3,
                                        grid=(0.0, 0.4, 0.8), refine=GROUPS),  # per-channel scales too
                    quantization=Quantization(method="smoothquant"))
    with caplog.at_level("INFO", logger="llmq.guard"):
        rep = run(recipe, tmp_path / "out", progress=False)
    g = rep.guard
    assert g is not None and g["held_out_windows"] == 3 and g["held_out_tokens"] == 3 * 31
    kls = {k: v["kl_divergence"] for k, v in g["candidates"].items()}
    first = ["alpha 0", "auto", "auto, no rotation", "auto, window mean",  # untied: rotate auto
             "family alpha 0.85"]  # statistic auto: the window mean is a rival
    lowest = min(first, key=lambda k: (kls[k], k != "auto"))  # auto first on a tie, as the guard keeps it
    assert sorted(kls) == sorted([*first, f"{lowest}, equal GPTQ weights"])  # then the sink weighting flipped
    said = [r.getMessage() for r in caplog.records if r.name == "llmq.guard"]  # what a user watching sees
    assert said[0].startswith(f"guard: auto's held-out KL {kls['auto']:.4g} (93 tokens); building 4 rivals")
    for i, name in enumerate(k for k in g["candidates"] if k in first and k != "auto"):  # in build order
        assert said[1 + 2 * i : 3 + 2 * i] == [f"guard: building {name} ({i + 1} of 4)",
                                               f"guard: {name}: held-out KL {kls[name]:.4g}"]
    flip = f"{lowest}, equal GPTQ weights"
    assert said[9:11] == [f"guard: building {flip} (the lowest so far, GPTQ's first position weighted the other "
                          "way)", f"guard: {flip}: held-out KL {kls[flip]:.4g}"]
    assert kls[g["chosen"]] == min(kls.values()) and kls[g["chosen"]] <= kls["alpha 0"]
    assert g["fell_back"] == (g["chosen"] != "auto")
    assert rep.gptq_sink == (g["chosen"] != flip)  # the report is the shipped build's
    from llmq.calibrate import load_act_scales

    shipped = "window-mean" if g["chosen"].startswith("auto, window mean") else "max"  # what the shipped model read
    assert rep.calibration.statistic == shipped
    assert load_act_scales(tmp_path / "out" / "act_scales.safetensors").statistic == shipped
    assert rep.calibration.samples == 6 and rep.calibration.tokens == 6 * 32  # held-out windows not used
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Guard" in card and f"{kls['alpha 0']:.4g}" in card
    if g["chosen"].startswith("auto"):  # the auto search's per-channel scales, in the report and the card
        ratios = rep.refined["ratios"]
        assert rep.refined["groups"] == list(GROUPS) and set(ratios) <= set(rep.alphas)
        assert all(0 < v < 1 for v in ratios.values())
        assert f"Per-channel scales (`smoothing.refine`: {', '.join(GROUPS)})" in card
        assert (f"{len(ratios)} of {len(rep.alphas)} took them" if ratios else "none of") in card
    else:
        assert rep.refined is None


def test_weight_only_auto_scales_guards_and_reloads_stock(tmp_path):
    """Weight-only with alpha auto: activation-aware scaling searched per layer, checked against no scaling on
    held-out windows; what shipped is what stock transformers reloads, and the card says so."""
    from transformers import AutoModelForCausalLM

    fp = _fp_folder(tmp_path, "llama")
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(4000))
    recipe = Recipe(model=str(fp), calibration=Calibration(source=str(text), samples=6, seq_len=32),
                    smoothing=Smoothing(alpha="auto", auto_tokens=64, guard_windows=3, grid=(0.0, 0.4, 0.8)),
                    quantization=Quantization(method="weight-only", rotate=False))  # the scaling alone
    rep = run(recipe, tmp_path / "out", progress=False)
    g = rep.guard
    kls = {k: v["kl_divergence"] for k, v in g["candidates"].items()}
    first = ["alpha 0", "auto", "auto, window mean"]
    assert sorted(k for k in kls if k in first) == first and kls[g["chosen"]] == min(kls.values())
    assert [k for k in kls if k not in first] == [f"{min(first, key=kls.get)}, equal GPTQ weights"]
    groups = {t.key for t in smooth_targets(AutoModelForCausalLM.from_pretrained(fp))}
    assert rep.alpha == "auto" and set(rep.alphas) == groups and rep.refined is None  # off (and W8A8 only)
    if g["chosen"].startswith("alpha 0"):
        assert set(rep.alphas.values()) == {0.0}
    assert _held_out_kl(tmp_path / "out", fp, recipe) == pytest.approx(kls[g["chosen"]], rel=1e-4)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert q.config.quantization_config.llm_int8_threshold == pytest.approx(1e-6)
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("activation-aware scaling" in card) == any(a != 0 for a in rep.alphas.values())
    assert "Smoothing strength (alpha)" in card and "family alpha" not in card


@pytest.mark.parametrize("a16", [(), ("down_proj",)])
def test_rank_by_kl_is_each_linears_end_to_end_effect(a16):
    """--max-kl's ranking: a linear's effect is the KL(FP || model), measured through the whole model, with only
    it in int8; with every linear back in float the (smoothed) float model gives FP's logits (with
    quantization.a16 too: the float modules carry llmq/a16.py's rescaling)."""
    import torch.nn.functional as F

    from llmq.guard import _swap_, rank_by_kl
    from llmq.run import _quantize_

    model = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # peaked logits: a KL far above float32 rounding (random init is flat)
    fp = copy.deepcopy(model)
    recipe = Recipe(model="tiny", calibration=Calibration(samples=4, seq_len=32), smoothing=Smoothing(alpha=0.5),
                    quantization=Quantization(method="smoothquant", max_kl=1.0, storage_dtype="float32", a16=a16,
                                              rotate=False))  # the rotation's float32 rounding alone is ~1e-5 x base
    torch.manual_seed(1)
    windows = torch.randint(0, 256, (4, 32))
    _, _, res = _quantize_(model, None, recipe, windows=windows, progress=False)
    rank_on = windows[:2]

    @torch.inference_mode()
    def kl() -> float:
        p, q = (F.log_softmax(m(rank_on).logits.float(), -1) for m in (fp, model))
        return float(F.kl_div(q, p, reduction="sum", log_target=True) / rank_on.numel())

    base = kl()
    effect = rank_by_kl(model, rank_on, fp, res.originals)
    assert set(effect) == set(res.originals) and len(effect) == 14  # 7 per layer, lm_head skipped
    assert base > 0 and kl() == base  # rank_by_kl left every int8 module in place
    assert all(0 < v < base for v in effect.values())
    top = max(effect, key=effect.get)
    int8 = {n: _swap_(model, n, res.originals[n]) for n in res.originals if n != top}
    only_top = kl()
    int8[top] = _swap_(model, top, res.originals[top])
    floor = kl()
    assert floor < 1e-5 * base  # every linear back in float: the smoothed float model (float32 rounding)
    assert effect[top] == pytest.approx(only_top - floor, rel=1e-5)  # what only `top` in int8 adds


def test_max_kl_keeps_sensitive_linears_in_float_and_reloads_stock(tmp_path):
    import json
    import subprocess
    import sys

    from test_quantize import RELOAD

    from llmq.run import quantize_model_

    fp = _fp_folder(tmp_path, "llama")
    text = tmp_path / "calib.txt"
    text.write_text(tiny_text(4000))
    base = Recipe(model=str(fp), calibration=Calibration(source=str(text), samples=4, seq_len=32),
                  smoothing=Smoothing(alpha=0.0, guard_windows=2), quantization=Quantization(method="smoothquant"))
    free = run(base.override({"quantization.max_kl": 1e9}), tmp_path / "free", progress=False)
    assert free.guard is None and free.keep["met"] and free.keep["kept"] == []
    # the KL measured in memory is the KL of the checkpoint as stock transformers reloads it
    assert free.keep["kl_before"] == pytest.approx(_held_out_kl(tmp_path / "free", fp, base), rel=1e-5)
    target = 0.5 * free.keep["kl_before"]
    rep = run(base.override({"quantization.max_kl": target}), tmp_path / "out", progress=False)
    keep = rep.keep
    assert keep["met"] and keep["kl_after"] <= target < keep["kl_before"] and keep["kept"]
    assert keep["kl_before"] == pytest.approx(free.keep["kl_before"], rel=1e-6)  # same model before any is kept
    ranked = sorted(keep["kl_added"], key=lambda n: -keep["kl_added"][n])
    assert keep["kept"] == ranked[:len(keep["kept"])]  # the costliest first
    assert keep["rank_tokens"] == 2 * 32 and free.keep["rank_tokens"] == 0  # 2 calibration windows; none needed
    assert keep["extra_bytes"] > 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Kept in 16-bit" in card and f"`{keep['kept'][0]}`" in card and "met" in card
    assert "alone in int8 on 64 calibration tokens" in card
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert cfg["llm_int8_skip_modules"] == ["lm_head", *keep["kept"]]
    ids = [[5, 9, 33, 7, 101, 200, 17, 3]]
    out = tmp_path / "reload.pt"
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "out"), json.dumps(ids), str(out)], check=True)
    got = torch.load(out)
    from transformers import AutoModelForCausalLM
    mine = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    kept_types = {type(mine.get_submodule(n)).__name__ for n in keep["kept"]}
    assert kept_types == {"Linear"} and "Linear8bitLt" in got["types"]
    assert quantize_model_  # the public API stays importable


def _held_out_kl(folder, fp, recipe) -> float:
    """KL of a saved int8 folder on the run's held-out windows (as llmq.run splits them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmq.evaluate import evaluate_ids
    from llmq.run import calibration_split

    tok = AutoTokenizer.from_pretrained(fp)
    _, held = calibration_split(tok, recipe.override({"quantization.max_kl": 1.0}), None)  # as a --max-kl run
    q = AutoModelForCausalLM.from_pretrained(folder).eval()
    ref = AutoModelForCausalLM.from_pretrained(fp).eval()
    return evaluate_ids(q, held.reshape(-1), held.shape[1], reference=ref, progress=False).kl_divergence


def test_reference_logits_score_as_the_live_reference():
    """The guard scores candidates against the float model's logits stored once in a temporary file, so the
    float model need not stay in memory: the numbers are those of scoring against the live model."""
    from llmq.guard import _score, reference_logits
    from llmq.quantize import quantize_

    fp = tiny_llama()
    model = copy.deepcopy(fp)
    quantize_(model, Quantization(method="smoothquant"), progress=False)
    held = torch.randint(3, 250, (3, 20), generator=torch.Generator().manual_seed(0))
    store = reference_logits(fp, held)
    try:
        assert store is not fp and _score(model, store, held) == _score(model, fp, held)
        assert _score(fp, store, held)["kl_divergence"] == 0.0
    finally:
        store.close()
    many = torch.randint(3, 250, (30, 20), generator=torch.Generator().manual_seed(1))
    assert reference_logits(fp, many) is fp  # 570 x 256 float32 logits outweigh the 0.4 MB model: kept live


@pytest.mark.parametrize(("chosen", "verdict"), [
    ("auto", "Auto had the lowest held-out KL and was shipped."),
    ("auto, window mean", "The lowest held-out KL was auto, window mean's (auto's search, window mean), so it was "
                          "shipped."),
    ("alpha 0", "Auto's held-out KL was above alpha 0's, so alpha 0 was shipped."),
    ("auto, equal GPTQ weights", "The lowest held-out KL was auto, equal GPTQ weights's (auto's search, equal GPTQ "
                                 "weights), so it was shipped."),
])
def test_card_says_which_candidate_shipped_and_why(chosen, verdict):
    from llmq.card_checks import checks
    from llmq.report import Report

    kl = {"auto": 0.03, "alpha 0": 0.02, "auto, window mean": 0.01, "auto, equal GPTQ weights": 0.04}
    kl[chosen] = 0.001
    cands = {k: {"alpha": "auto" if k.startswith("auto") else 0.0, "kl_divergence": v, "top1_agreement": 0.9,
                 "nll": 2.0} for k, v in kl.items()}
    guard = {"chosen": chosen, "fell_back": chosen != "auto", "held_out_windows": 4, "held_out_tokens": 2044,
             "candidates": cands}
    text = "\n".join(checks(Report("smoothquant", 0.0, alpha="auto", guard=guard)))
    assert verdict in text and f"| {chosen} (shipped) |" in text and text.count("(shipped)") == 1
