"""GPTQ int8 weights (llmq/gptq.py) and Linear8bitLt modules built from them (llmq.quantize.int8_linear)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from test_quantize import RELOAD

from llmq.gptq import CLIP_GRID, Hessians, dequantize, hessian_error, quantize_weight, rtn_weight
from llmq.quantize import int8_linear


def _data(n=2048, d_in=96, d_out=48, seed=0, outliers=(5, 40)):
    """Correlated inputs (low-rank mix + noise) with a few large channels, as LLM activations have."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g) @ torch.randn(8, d_in, generator=g) + 0.3 * torch.randn(n, d_in, generator=g)
    X[:, list(outliers)] *= 20.0
    W = torch.randn(d_out, d_in, generator=g) * 0.05
    return X, W


def _out_err(X, W, CB, SCB):
    return float((X @ W.T - X @ dequantize(CB, SCB).T).norm())


def test_hessians_accumulate_once_per_shared_input():
    lin = {n: torch.nn.Linear(16, 4) for n in ("q", "k", "v", "o")}
    X = torch.randn(3, 5, 16)
    with Hessians(lin, shared={"q": "attn", "k": "attn", "v": "attn"}) as hs:
        for n in ("q", "k", "v", "o"):
            lin[n](X)
    lin["o"](X)  # after exit: hooks gone
    flat = X.reshape(-1, 16)
    assert torch.allclose(hs["k"], flat.T @ flat, rtol=1e-5, atol=1e-5)
    assert hs["q"] is hs["v"] and sorted(hs.sums) == ["attn", "o"]
    assert hs.count("v") == hs.count("o") == 15


def test_hessians_sink_weighs_each_first_position_as_the_rest_of_its_sequence():
    lin = torch.nn.Linear(16, 4)
    X, flat = torch.randn(3, 5, 16), torch.randn(7, 16)
    with Hessians({"a": lin}, sink=True) as hs, Hessians({"a": lin}) as plain:
        lin(X)
    first, rest = X[:, 0], X[:, 1:].reshape(-1, 16)
    assert torch.allclose(hs["a"], 4 * first.T @ first + rest.T @ rest, rtol=1e-5, atol=1e-5)
    assert torch.allclose(plain["a"], X.reshape(-1, 16).T @ X.reshape(-1, 16), rtol=1e-5, atol=1e-5)
    assert hs.count("a") == 15
    with Hessians({"a": lin}, sink=True) as routed:  # token-routed inputs (2-D) have no first position
        lin(flat)
    assert torch.allclose(routed["a"], flat.T @ flat, rtol=1e-5, atol=1e-5)


def test_sink_weighting_keeps_the_first_positions_error_small():
    """An input every sequence starts with (the sink), unlike the rest: weighted, GPTQ's error along it falls."""
    X, W = _data(n=64 * 32)
    X = X.view(64, 32, -1)
    X[:, 0] = 30.0 * torch.randn(1, X.shape[-1], generator=torch.Generator().manual_seed(1))
    lin = torch.nn.Linear(X.shape[-1], W.shape[0], bias=False)
    with Hessians({"a": lin}) as plain, Hessians({"a": lin}, sink=True) as sink:
        lin(X)
    x0 = X[0, :1]

    def first_err(H):
        return float((x0 @ W.T - x0 @ dequantize(*quantize_weight(W, H)).T).norm())

    assert first_err(sink["a"]) < first_err(plain["a"]) / 2


def test_gptq_beats_rtn_on_correlated_inputs():
    X, W = _data()
    H = X.T @ X
    rtn = _out_err(X, W, *rtn_weight(W))
    for act_order in (True, False):
        gptq = _out_err(X, W, *quantize_weight(W, H, act_order=act_order))
        assert gptq < rtn / 2, (act_order, gptq, rtn)


def test_rtn_is_bitsandbytes_bit_for_bit():
    import bitsandbytes as bnb

    W = torch.randn(64, 200, generator=torch.Generator().manual_seed(3)) * 0.1
    W[3, 7] = 9.0
    p = bnb.nn.Int8Params(W.half(), requires_grad=False, has_fp16_weights=False).to("cpu")
    CB, SCB = rtn_weight(W)
    assert CB.dtype == torch.int8 and SCB.dtype == torch.float32
    assert torch.equal(CB, p.CB) and torch.equal(SCB, p.SCB)
    assert torch.equal(dequantize(CB, SCB), bnb.functional.int8_vectorwise_dequant(p.CB, p.SCB))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipping_never_increases_hessian_error(seed):
    X, W = _data(seed=seed)
    W[:, 3] *= 30.0  # a heavy-tailed weight column on a quiet input: worth clipping
    H = X.T @ X
    plain = hessian_error(W, dequantize(*rtn_weight(W)), H)
    clipped = hessian_error(W, dequantize(*rtn_weight(W, H, clip=True)), H)
    assert (clipped <= plain).all() and (clipped < plain).any()
    assert torch.equal(rtn_weight(W, H, clip=True, clip_grid=(1.0,))[0], rtn_weight(W)[0])
    plain = hessian_error(W, dequantize(*quantize_weight(W, H, clip_grid=(1.0,))), H)
    clipped = hessian_error(W, dequantize(*quantize_weight(W, H)), H)
    assert (clipped <= plain * (1 + 1e-5)).all() and (clipped < plain).any()


def test_dead_input_channels_keep_their_rtn_value_and_pass_no_error():
    X, W = _data()
    dead = [2, 50]
    X[:, dead] = 0.0
    H = X.T @ X
    W[:, dead] = 0.001  # below every row's max: the scales do not depend on them
    CB, SCB = quantize_weight(W, H)
    assert torch.equal(CB[:, dead], torch.round(W[:, dead] * (127.0 / SCB[:, None])).to(torch.int8))  # not zeroed
    W2 = W.clone()
    W2[:, dead] = -0.002
    CB2, SCB2 = quantize_weight(W2, H)
    live = [j for j in range(W.shape[1]) if j not in dead]
    assert torch.equal(SCB, SCB2) and torch.equal(CB[:, live], CB2[:, live])  # no error flows out of them
    assert _out_err(X, W, CB, SCB) < _out_err(X, W, *rtn_weight(W))


@pytest.mark.parametrize("sub", [1, 8, 13])
def test_two_level_sweep_is_the_one_level_sweep_up_to_rounding(sub):
    """Sub-blocking the column sweep only reorders sums: the same int8 values except where a reordered sum
    crosses a rounding boundary, and the same Hessian error."""
    from llmq.factor import inverse_cholesky
    from llmq.gptq import _sweep

    X, W = _data(d_in=300, d_out=64)
    H = X.T @ X
    U = inverse_cholesky(H, 0.01)
    scale = W.abs().amax(1)
    # the sweep works on W transposed; one level: every column updates the rest of its block
    one = _sweep(W.t().contiguous(), U, scale, block=128, sub=128).t()
    two = _sweep(W.t().contiguous(), U, scale, block=128, sub=sub).t()
    assert (one != two).float().mean() <= 1e-3 and (one - two).abs().max() <= 2
    err = [hessian_error(W, q * scale.view(-1, 1) / 127, H).sum() for q in (one, two)]
    assert abs(err[1] / err[0] - 1) <= 1e-3
    # and the blocking is not a no-op: the sweep is GPTQ, not round-to-nearest
    assert (one != torch.round(W * 127 / scale.view(-1, 1))).any()


def test_gptq_is_deterministic_and_survives_singular_hessians():
    X, W = _data(n=16)  # 16 rows for 96 inputs: H is rank-deficient, needs the damping
    H = X.T @ X
    a, b = quantize_weight(W, H), quantize_weight(W, H)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert _out_err(X, W, *a) < _out_err(X, W, *rtn_weight(W))
    undamped = quantize_weight(W, H, damp=0.0)  # singular: Cholesky fails, the retry adds damping
    assert _out_err(X, W, *undamped) < _out_err(X, W, *rtn_weight(W))
    CB, SCB = quantize_weight(W, torch.zeros(96, 96))  # nothing calibrated: plain RTN in float32
    assert torch.equal(SCB, W.abs().amax(1))
    assert torch.equal(CB, torch.round(W * (127.0 / SCB[:, None])).to(torch.int8))


def test_int8_linear_computes_with_the_dequantized_weight():
    X, W = _data(n=64)
    CB, SCB = quantize_weight(W, X.T @ X)
    bias = torch.randn(W.shape[0])
    m = int8_linear(CB, SCB, bias, threshold=1e-6)  # weight-only W8A16
    assert not m.training and m.weight.dtype == torch.int8
    with torch.no_grad():
        got = m(X)
    ref = torch.nn.functional.linear(X, dequantize(CB, SCB), bias)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4), (got - ref).abs().max()


def test_gptq_checkpoint_reloads_with_stock_transformers(tmp_path):
    import json

    from llmq.config import Quantization
    from llmq.quantize import bnb_quantization_config, linear_names
    from llmq.save import save_checkpoint

    model, tok = tiny_llama(), tiny_tokenizer()
    cfg = Quantization(method="weight-only")
    names = linear_names(model, cfg.skip)
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with Hessians({n: model.get_submodule(n) for n in names}) as hs, torch.no_grad():
        model(ids)
    for n in names:
        parent, _, child = n.rpartition(".")
        old = model.get_submodule(n)
        CB, SCB = quantize_weight(old.weight, hs[n])
        setattr(model.get_submodule(parent), child, int8_linear(CB, SCB, old.bias, cfg.effective_threshold))
    model.config.quantization_config = bnb_quantization_config(cfg, model)
    save_checkpoint(model, tok, tmp_path / "q")
    probe = [[5, 9, 33, 7, 101, 200, 17, 3]]
    with torch.no_grad():
        ours = model(torch.tensor(probe)).logits
    out = tmp_path / "reload.pt"
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "q"), json.dumps(probe), str(out)], check=True)
    got = torch.load(out)
    assert torch.equal(got["logits"], ours), (got["logits"] - ours).abs().max()


def test_clip_grid_starts_at_no_clipping():
    assert CLIP_GRID[0] == 1.0 and min(CLIP_GRID) == 0.8


def test_input_scales_are_exact_for_row_scaled_weights():
    """v_proj / up_proj are smoothed twice: input columns by s (their group), rows by t (they feed o_proj /
    down_proj). GPTQ needs s alone, up to a constant; a ratio of column abs-sums is off by up to ~20% per
    column (t mixed in by each column's weights), the mean log ratio is exact."""
    from llmq.stage import input_scales

    g = torch.Generator().manual_seed(0)
    w = torch.randn(192, 576, generator=g)
    w[3, 7] = 0.0  # a zero weight is skipped, not a log of 0
    w[:, 11] = 0.0  # a dead column gets 1
    s, t = torch.exp(torch.randn(576, generator=g)), torch.exp(torch.randn(192, generator=g))
    after = w / t[:, None] * s[None, :]
    got = input_scales(w, after)
    live = torch.ones(576, dtype=torch.bool)
    live[11] = False
    ratio = got[live] / s[live]
    assert got[11] == 1.0 and (ratio.max() / ratio.min() - 1) < 1e-4
    colsum = after.abs().sum(0)[live] / w.abs().sum(0)[live] / s[live]
    assert colsum.max() / colsum.min() > 1.2  # what the column-sum ratio gave
    no_rows = input_scales(w, w * s[None, :])[live] / s[live]  # no row scaling: s, up to the factor
    assert (no_rows.max() / no_rows.min() - 1) < 1e-4


def test_card_states_the_sink_weighting():
    from llmq.card import _method
    from llmq.report import Report

    def text(**kw):
        return _method(Report(method="smoothquant", threshold=0.0, **kw), "smoothquant")

    assert "attention sink" in text(gptq=True, gptq_sink=True)
    assert "chosen by GPTQ" in text(gptq=True) and "attention sink" not in text(gptq=True)
    assert "GPTQ" not in text()


@pytest.mark.parametrize("act_order", [True, False])
def test_input_scale_equals_the_scaled_hessian(act_order):
    """quantize_weight(W, H, in_scale=s) is GPTQ on D H D (D = diag(1 / s)), bit for bit, without the caller
    holding that second [in, in] matrix; an input dead in H stays dead."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(600, 96, generator=g) * torch.rand(96, generator=g) * 3
    X[:, 5] = 0.0
    W, s = torch.randn(40, 96, generator=g), torch.rand(96, generator=g) * 4 + 0.1
    H = X.T @ X
    want = quantize_weight(W, H / s[:, None] / s[None, :], act_order=act_order)
    got = quantize_weight(W, H, act_order=act_order, in_scale=s)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert not torch.equal(got[0], quantize_weight(W, H, act_order=act_order)[0])  # the scales matter


@pytest.mark.parametrize("act_order", [True, False])
def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(act_order):
    """llmq/factor.py's route (one Cholesky of the reversed matrix, a triangular inverse in place) against the
    textbook one on the matrix made explicitly: P = D H D permuted, dead inputs decoupled, damped."""
    from llmq.factor import inverse_cholesky

    X, _ = _data(n=400, d_in=96)
    X[:, 7] = 0.0
    H = X.T @ X
    s = torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.5
    diag = H.diagonal() / s / s
    dead = diag <= 0
    diag[dead] = diag[~dead].mean()
    order = torch.argsort(diag, descending=True) if act_order else torch.arange(96)
    U = inverse_cholesky(H, 0.01, order=order, in_scale=s, diag=diag, dead=dead)
    P = (H / s[:, None] / s[None, :]).double()
    P[dead], P[:, dead] = 0, 0
    P.diagonal().copy_(diag.double())
    P = P[order][:, order]
    P = P.tril() + P.tril(-1).T  # Cholesky reads the lower triangle, the textbook inverse both (rounding differs)
    P.diagonal().add_(0.01 * float(diag.double().mean()))
    want = torch.linalg.cholesky(torch.linalg.inv(P), upper=True)
    assert torch.equal(U, torch.triu(U)) and (U.diagonal() > 0).all()
    assert ((U.double() - want).abs().max() / want.abs().max()) < 1e-6
    assert (U.double().T @ U.double() @ P - torch.eye(96, dtype=torch.float64)).abs().max() < 1e-4


def test_gptq_memory_is_what_the_plan_counts():
    """`working_bytes` (llmq/plan.py's figure) holds quantize_weight's peak, and the factorization keeps one
    float64 [in, in] matrix and U (3 x in^2 x 4 bytes; the textbook route held 5). Measured in a fresh process
    whose malloc maps every block of 1 MiB or more, so that its resident size follows what is alive."""
    code = """if 1:
        import gc, torch
        from llmq.factor import inverse_cholesky
        from llmq.gptq import STAGE_CLIP_GRID, quantize_weight, working_bytes
        from llmq.memory import PeakMemory
        g = torch.Generator().manual_seed(0)
        n, out = 4096, 1024
        X = torch.randn(n + 64, n, generator=g)
        H, W = X.T @ X, torch.randn(out, n, generator=g)
        del X
        gc.collect()
        with PeakMemory() as factor:
            inverse_cholesky(H, 0.01)
        with PeakMemory() as whole:
            quantize_weight(W, H, clip_grid=STAGE_CLIP_GRID)
        print(factor.above_baseline_bytes / (n * n * 4), whole.above_baseline_bytes / working_bytes(out, n))"""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    factor, whole = map(float, run.stdout.split())
    assert 3.0 <= factor < 4.0  # 16 MiB pieces on top: 0.25 units at this size
    assert 0.5 < whole <= 1.0
