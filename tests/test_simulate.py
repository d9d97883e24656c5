"""Simulated W8A8 (llmq/simulate.py): agreement with real bitsandbytes W8A8, the O1-O3 granularities,
the exact static maxima after smoothing, and the simulated alpha search."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama

from llmq.alpha import search_alpha_
from llmq.calibrate import calibrate
from llmq.config import Quantization
from llmq.errors import ConfigError
from llmq.fakequant import fq
from llmq.quantize import linear_names, quantize_
from llmq.simulate import (
    SimMode,
    fq_act,
    sim_error,
    simulate_,
    simulated_perplexity,
    static_amax,
)
from llmq.smooth import expand_to_inputs, smooth_, smooth_target_, smooth_targets


def _ids(shape=(4, 64), seed=0):
    return torch.randint(3, 256, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _simulated(model, mode, amax=None):
    sim = copy.deepcopy(model)
    simulate_(sim, mode, linear_names(sim, ("lm_head",)), amax)
    return sim


def test_mode_validation():
    assert SimMode("static", "tensor").name == "O3-tensor"
    with pytest.raises(ConfigError, match="allowed act"):
        SimMode("row", "channel")
    with pytest.raises(ConfigError, match="abs-max"):
        fq_act(torch.ones(2, 2), "static")
    with pytest.raises(ConfigError, match="static_amax"):
        simulate_(tiny_llama(), SimMode("static"), ["model.layers.0.mlp.up_proj"], amax=None)


def test_per_token_simulation_is_bitsandbytes_w8a8_on_one_linear():
    """bitsandbytes casts to float16 and then quantizes per row; with float16-exact inputs the simulation
    reproduces its output to rounding, while per-tensor activations do not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g).half().float()
    lin = torch.nn.Linear(64, 32, bias=False).eval()
    with torch.no_grad():
        lin.weight.copy_(lin.weight.half().float())
    w = lin.weight.detach().clone()
    m = torch.nn.Sequential(lin)
    m.config = SimpleNamespace()
    fp = x @ w.t()
    quantize_(m, Quantization(method="smoothquant", skip=()), progress=False)
    real = _logits_of(m, x)
    o1 = fq_act(x, "token") @ fq(w, -1).t()
    o2 = fq_act(x, "tensor") @ fq(w, -1).t()
    quant_err = (fp - real).abs().max()
    assert (o1 - real).abs().max() < 0.02 * quant_err
    assert (o2 - real).abs().max() > 0.2 * quant_err


def _logits_of(m, x):
    with torch.no_grad():
        return m(x).float()


def test_per_token_simulation_matches_real_w8a8_on_tiny_model():
    """Whole model, alpha 0: the O1 simulation lands nearer the real bitsandbytes W8A8 logits than FP does,
    with the same error level vs FP; O2 (per-tensor activations) errs clearly more."""
    m = tiny_llama()
    ids = _ids()
    fp = _logits(m, ids)
    q = copy.deepcopy(m)
    quantize_(q, Quantization(method="smoothquant"), progress=False)
    real = _logits(q, ids)
    o1 = _logits(_simulated(m, SimMode("token", "channel")), ids)
    o2 = _logits(_simulated(m, SimMode("tensor", "channel")), ids)
    real_err = (real - fp).norm()
    assert (o1 - real).norm() < 0.85 * real_err
    assert 0.8 < (o1 - fp).norm() / real_err < 1.25
    assert (o2 - fp).norm() > 1.2 * (o1 - fp).norm()


def test_hooks_remove_activation_quantization_only():
    m = tiny_llama()
    ids = _ids((1, 32))
    sim = copy.deepcopy(m)
    handles = simulate_(sim, SimMode("tensor", "tensor"), linear_names(sim, ("lm_head",)))
    with_act = _logits(sim, ids)
    for h in handles:
        h.remove()
    weights_only = _logits(sim, ids)
    fp = _logits(m, ids)
    assert not torch.equal(with_act, weights_only)
    assert not torch.equal(weights_only, fp)  # the weights stay fake-quantized
    w = sim.model.layers[0].mlp.up_proj.weight
    assert w.unique().numel() <= 255  # one per-tensor grid: at most 255 levels


def _eye_model():
    lin = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))  # exact under per-channel int8
    return torch.nn.Sequential(lin)


def test_static_clips_beyond_calibrated_max():
    m = _eye_model()
    simulate_(m, SimMode("static", "channel"), ["0"], {"0": 2.0})
    x = torch.tensor([[5.0, -7.0, 1.0, 0.5]])
    y = _logits_of(m, x)
    assert y[0, 0].item() == pytest.approx(2.0) and y[0, 1].item() == pytest.approx(-2.0)
    step = 2.0 / 127
    assert abs(y[0, 2].item() - 1.0) <= step / 2 + 1e-6 and abs(y[0, 3].item() - 0.5) <= step / 2 + 1e-6
    dyn = _eye_model()
    simulate_(dyn, SimMode("tensor", "channel"), ["0"])
    assert _logits_of(dyn, x)[0, 1].item() == pytest.approx(-7.0)  # dynamic: no clipping


def test_per_tensor_never_finer_than_per_token_with_an_outlier():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[3, 7] = 80.0  # one outlier token
    w = torch.randn(16, 32, generator=g)
    ref = x @ w.t()
    ones = torch.ones(32)
    x_max = x.abs().amax(0)
    errs = {act: sim_error(SimMode(act, "channel"))(x, w, ones, ref, x_max) for act in ("token", "tensor", "static")}
    assert errs["token"] < errs["tensor"] / 10
    assert errs["static"] == pytest.approx(errs["tensor"])  # static at the true max == dynamic per tensor
    e_wt = sim_error(SimMode("token", "tensor"))(x, w, ones, ref, x_max)
    assert e_wt >= errs["token"]


def test_smooth_target_equals_smooth_and_static_max_is_exact():
    """The scales smooth_target_ returns reproduce smooth_, and max|X|/s equals a recalibration of the
    smoothed model."""
    m = tiny_llama()
    windows = _ids((4, 32), seed=1)
    names = linear_names(m, ("lm_head",))
    stats = calibrate(m, windows, names, progress=False)
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    s_in = {}
    for t in smooth_targets(a):
        s = smooth_target_(a, t, stats.act_max, 0.6)
        s_in.update({n: expand_to_inputs(t, s) for n in t.linear_names})
    smooth_(b, stats.act_max, 0.6)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    assert sorted(s_in) == sorted(names)  # all four groups cover every llama linear
    amax = static_amax(stats.act_max, s_in, names)
    again = calibrate(a, windows, names, progress=False).act_max
    for n in names:
        assert amax[n] == pytest.approx(float(again[n].max()), rel=1e-4), n
    c = copy.deepcopy(m)
    assert all(smooth_target_(c, t, stats.act_max, 0.0) is None for t in smooth_targets(c))
    assert all(torch.equal(p, q) for p, q in zip(c.state_dict().values(), m.state_dict().values(), strict=True))


def test_simulated_search_never_worse_than_naive_and_sweep_runs():
    m = tiny_llama()
    # an outlier channel feeding the attention group, as in LLMs
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight[5] = 30.0
    windows = _ids((4, 32), seed=2)
    targets = smooth_targets(m)
    names = linear_names(m, ("lm_head",))
    stats = calibrate(m, windows, names, sample_names=tuple(t.linear_names[0] for t in targets),
                      sample_tokens=64, progress=False)
    mode = SimMode("tensor", "channel")
    grid = (0.0, 0.25, 0.5, 0.75)
    s = copy.deepcopy(m)
    chosen, errors = search_alpha_(s, smooth_targets(s), stats, grid, error=sim_error(mode), progress=False)
    assert set(chosen) == {t.key for t in targets} and set(chosen.values()) <= set(grid)
    assert chosen["model.layers.0.attn"] > 0  # the outlier makes per-tensor smoothing pay
    assert all(errors[k][f"{a:g}"] <= errors[k]["0"] for k, a in chosen.items())

    base = {k: v.clone() for k, v in m.state_dict().items()}
    ids = _ids((1, 96), seed=3).reshape(-1)
    naive = simulated_perplexity(m, base, ids, 32, stats, SimMode("static", "channel"), 0.0, names=names)
    auto = simulated_perplexity(m, base, ids, 32, stats, SimMode("static", "channel"), "auto", names=names,
                                grid=grid)
    assert naive["mode"] == "O3-channel" and naive["mean_alpha"] == 0.0 and naive["tokens"] == 93
    assert 0.0 < auto["mean_alpha"] <= 0.75
    assert auto["perplexity"] < naive["perplexity"]
