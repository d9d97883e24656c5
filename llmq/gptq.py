"""Error-compensated int8 weights: GPTQ (Frantar et al. 2023) in bitsandbytes' vector-wise int8 format.

Format (what `Linear8bitLt` stores and stock transformers reloads): per output row r, int8 values CB[r] in
[-127, 127] and one float32 scale SCB[r]; the weight is CB * SCB[:, None] / 127, computed exactly as
bitsandbytes dequantizes (`dequantize`). Round-to-nearest (RTN, bitsandbytes' own) takes SCB = max|W_r|.

For one linear with weight W [out, in] and H = sum_t x_t x_t^T over its calibration inputs (`Hessians`),
GPTQ minimises ||X W^T - X Wq^T||^2 = sum_r (W_r - Wq_r) H (W_r - Wq_r)^T (`hessian_error`):

1. scale: SCB[r] = f * max|W_r| (1.0 = bitsandbytes' abs-max). Given U (step 3) the rows are independent, so
   the sweep runs once per f in `clip_grid` and each row keeps the f with its least error on that metric:
   never worse than no clipping there. Act-order needs no care, since the scales are per row.
2. dead inputs (H_jj = 0: x_j was 0 on every calibration token) cost nothing on the metric, so GPTQ zeroes
   W[:, j]. Here they keep their RTN value instead: calibration proves nothing about x_j at deployment,
   and H is made to decouple j (row and column zero, diagonal > 0), so no error flows into or out of them.
3. act_order: columns in decreasing H_jj. Damping: H += damp * mean(live H_jj) * I (x10 per retry while
   Cholesky fails). U = upper Cholesky factor of H^-1.
4. sweep each column j, in blocks of `block` columns (lazy batch updates): q_j = int8 RTN of w_j at SCB;
   e = (w_j - q_j) / U_jj; w_k -= e * U_jk for the later columns k. Finally undo the permutation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import NumericalError
from .factor import inverse_cholesky, scaled

INV127 = 7.874015718698502e-3  # bitsandbytes' int8_vectorwise_dequant constant, float32 1/127
SWEEP_ELEMENTS = 2**24  # weight entries swept at once, over the clip factors (a stacked copy and its update)
CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))  # 1.0, 0.98, ..., 0.8
STAGE_CLIP_GRID = (1.0, 0.95, 0.9, 0.85)  # what llmq/stage.py sweeps: the sweep's cost is linear in the grid


def _pattern(name: str) -> str:
    """`name` with its layer index generalised: model.layers.3.mixer.dt_proj -> model.layers.\\d+.mixer.dt_proj."""
    return re.sub(r"\.\d+\.", r".\\d+.", name, count=1)


class Hessians:
    """Running H = sum X^T X (and the row count) of the inputs of `modules`, from forward pre-hooks.

    `shared` maps a module name to a key: modules with one key read the same input (q/k/v after one norm),
    which is then accumulated once, from the first of them. Use as a context manager around the forwards;
    hooks are removed on exit. Only [in, in] sums are kept, never activations.

    `sink`: each sequence's first position (of inputs [batch, seq, in]) weighs in H as much as the rest of its
    sequence together (seq - 1 times a token). That position is the attention sink: later tokens put much of
    their attention on it, so an error in its keys and values reaches every token (docs/benchmarks.md, "The
    first position in GPTQ's Hessians"); GPTQ then keeps the weights' error small along that input.
    Token-routed (2-D) inputs have no positions and are summed as they are.
    """

    def __init__(self, modules: Mapping[str, nn.Module], shared: Mapping[str, str] | None = None,
                 dtype: torch.dtype = torch.float32, sink: bool = False) -> None:
        self.sink = sink
        self.key = {n: (shared or {}).get(n, n) for n in modules}
        self.owners: dict[str, tuple[str, nn.Module]] = {}
        for n, m in modules.items():
            self.owners.setdefault(self.key[n], (n, m))
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles: list = []

    def _hook(self, key: str):
        def fn(module, args):
            x = args[0].detach().to(self.dtype)
            if self.sink and x.dim() == 3 and x.shape[1] > 2:
                x = torch.cat([x[:, :1] * math.sqrt(x.shape[1] - 1), x[:, 1:]], 1)
            x = x.reshape(-1, x.shape[-1])
            h = self.sums.get(key)
            if h is None:
                h = self.sums[key] = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.dtype, device=x.device)
            h.addmm_(x.T, x)
            self.rows[key] = self.rows.get(key, 0) + x.shape[0]
        return fn

    def __enter__(self) -> Hessians:
        self._handles = [m.register_forward_pre_hook(self._hook(k)) for k, (_, m) in self.owners.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __getitem__(self, name: str) -> torch.Tensor:
        """H of module `name`'s input (shared with the other modules of its key)."""
        key = self.key[name]
        if key not in self.sums:
            raise NumericalError(
                f"no calibration input reached {name}: the model's forward never calls it (an unused "
                "cross-attention) or reads its weight directly (Mamba's dt_proj), so it cannot become int8; keep it "
                f"in 16-bit with --skip {name} (a pattern such as {_pattern(name)} covers every layer)")
        h = self.sums[key]
        if not torch.isfinite(h).all():
            raise NumericalError(f"non-finite activations (inf/nan) at the input of {name} during calibration; "
                                 "check the model's weights and dtype (try --dtype float32)")
        return h

    def count(self, name: str) -> int:
        """Input rows (tokens) accumulated into module `name`'s H."""
        return self.rows.get(self.key[name], 0)


def dequantize(CB: torch.Tensor, SCB: torch.Tensor) -> torch.Tensor:
    """float32 CB * SCB / 127, bit for bit as bitsandbytes dequantizes."""
    return CB.float() * SCB.float().view(-1, 1) * INV127


def _to_int8(W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # bitsandbytes' int8_vectorwise_quant: round(A * (127 / row_stats)); zero rows give 0, not nan
    inv = torch.where(scale > 0, 127.0 / scale, torch.zeros_like(scale))
    return torch.round(W * inv.view(-1, 1)).clamp_(-127, 127)


def hessian_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> torch.Tensor:
    """Per row r: (W_r - Wq_r) H (W_r - Wq_r)^T (plain squared error with H None); float32 [out]."""
    E = W.float() - Wq.float()
    return (E * E).sum(1) if H is None else ((E @ H.float()) * E).sum(1)


def choose_scale(W: torch.Tensor, H: torch.Tensor | None = None,
                 clip_grid: Sequence[float] = CLIP_GRID) -> torch.Tensor:
    """Per-row SCB = f * max|W_r|, f from `clip_grid` minimising the row's RTN `hessian_error` (first wins ties)."""
    W = W.float()
    amax = W.abs().amax(1)
    best, best_err = amax.clone(), None
    for f in clip_grid:
        scale = amax * f
        err = hessian_error(W, _to_int8(W, scale) * scale.view(-1, 1) * INV127, H)
        if best_err is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def rtn_weight(W: torch.Tensor, H: torch.Tensor | None = None, *, clip: bool = False,
               clip_grid: Sequence[float] = CLIP_GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest (CB int8, SCB float32) through float16 as bitsandbytes does: without `clip`, bit for
    bit `Int8Params`; with it, the row scales of `choose_scale` (on H, or plain MSE without H)."""
    A = W.detach().to(torch.float16).float()
    scale = choose_scale(A, H, clip_grid) if clip else A.abs().amax(1)
    return _to_int8(A, scale).to(torch.int8), scale


def _sweep(Wt: torch.Tensor, U: torch.Tensor, scale: torch.Tensor, block: int, sub: int = 8) -> torch.Tensor:
    """The GPTQ column sweep of (permuted) W at fixed row scales, on W transposed: `Wt` [in, out] (contiguous),
    overwritten with the int8 values as float32 and returned.

    Transposed, each input column of W the sweep rounds and updates is one contiguous row of `Wt` (on W itself
    each is a strided column: 1.7-4x slower on CPU at SmolLM2's shapes, the same arithmetic). Blocked
    twice: each column's error updates only the rest of its `sub`-column slice (rank-1 updates on [<= sub,
    out]), each finished slice the rest of its `block` and each finished block the rest of W (both matmuls,
    the last in place). The same algebra as one level; reordered sums move a few values across a rounding
    boundary (tests/test_gptq.py)."""
    inv = torch.where(scale > 0, 127.0 / scale, torch.zeros_like(scale))
    step = scale * INV127
    n_in = Wt.shape[0]
    diag = U.diagonal().tolist()
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.empty_like(W1)
        for k1 in range(0, i2 - i1, sub):
            k2 = min(k1 + sub, i2 - i1)
            for j in range(k1, k2):
                w = W1[j]
                q = torch.round(w * inv).clamp_(-127, 127)
                Wt[i1 + j] = q  # read into W1 already: Wt's own rows take the results
                e = torch.sub(w, q * step, out=Err[j]).div_(diag[i1 + j])
                if j + 1 < k2:
                    W1[j + 1:k2] -= U1[j, j + 1:k2, None] * e  # rank 1: U's row j times e
            if k2 < i2 - i1:
                W1[k2:] -= U1[k1:k2, k2:].t() @ Err[k1:k2]
        if i2 < n_in:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), Err, alpha=-1)
    return Wt


def working_bytes(out_f: int, n_in: int, grid: int = len(STAGE_CLIP_GRID)) -> int:
    """Bytes `quantize_weight` holds beside its caller's W and H (llmq/plan.py), counted in float32 entries:
    one float64 [in, in] matrix factored in place, then U (3 x in^2; one W more is counted there, as the plan
    always has, though only small temporaries sit beside them); then the permuted H, U, a copy of W per clip
    factor swept at once (updated in place), W permuted and the int8 result (2 x in^2 + (swept + 3) x out x in
    at most). Measured on CPU (tests/test_gptq.py)."""
    swept = min(grid, max(1, SWEEP_ELEMENTS // (out_f * n_in)))
    return max(3 * n_in + out_f, 2 * n_in + (swept + 3) * out_f) * n_in * 4


@torch.no_grad()
def quantize_weight(W: torch.Tensor, H: torch.Tensor, *, act_order: bool = True, damp: float = 0.01,
                    block: int = 128, clip_grid: Sequence[float] = CLIP_GRID,
                    in_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ for W [out, in] given its input's H [in, in] -> (CB int8 [out, in], SCB float32 [out]).

    `in_scale` s: W's inputs are H's divided by s (smoothing), so GPTQ uses D H D with D = diag(1 / s), made
    in pieces while permuting (no second [in, in] copy of H). See the module docstring; `clip_grid=(1.0,)` keeps
    bitsandbytes' abs-max scales. Deterministic."""
    W = W.detach().float()
    H = H.detach().to(W.device).float()
    n_in = W.shape[1]
    if H.shape != (n_in, n_in):
        raise ValueError(f"H must be [{n_in}, {n_in}] for a weight of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    s = None if in_scale is None else in_scale.detach().to(W.device).float()
    amax = W.abs().amax(1)
    diag = H.diagonal().clone() if s is None else H.diagonal() / s / s
    dead = diag <= 0
    if bool(dead.all()):
        return _to_int8(W, amax).to(torch.int8), amax
    diag[dead] = diag[~dead].mean()
    perm = torch.argsort(diag, descending=True, stable=True) if act_order else torch.arange(n_in, device=W.device)
    U = inverse_cholesky(H, damp, order=perm, in_scale=s, diag=diag, dead=dead)
    W = W[:, perm]  # a new tensor: the caller's W is left as it is
    H = scaled(H, perm, perm, s, dead)  # the error metric (dead inputs cost nothing), made after U: one at a time
    out_f, grid = W.shape[0], list(clip_grid)
    per = max(1, SWEEP_ELEMENTS // W.numel())  # grid points swept together, stacked as extra rows
    rows = max(1, 2**22 // n_in)  # rows scored at once: temporaries of 16 MiB
    CB, SCB, best = torch.empty(W.shape, dtype=torch.int8, device=W.device), amax.clone(), torch.empty_like(amax)
    for c in range(0, len(grid), per):  # rows are independent given U: each keeps its best f (first on ties)
        fs = grid[c:c + per]
        scales = torch.cat([amax * f for f in fs])
        Qt = _sweep(W.t().repeat(1, len(fs)), U, scales, block)  # [in, out x len(fs)]: one column per row of W
        if c + per >= len(grid):
            del U  # the last sweep is done: U is not beside the scoring's temporaries
        for k in range(len(fs)):
            for r1 in range(0, out_f, rows):  # in row pieces: no [out, in] temporaries beside Qt
                r2, i = min(r1 + rows, out_f), k * out_f
                Q, scale = Qt[:, i + r1:i + r2].t(), scales[i + r1:i + r2]
                err = hessian_error(W[r1:r2], Q * scale.view(-1, 1) * INV127, H)
                if c == k == 0:
                    CB[r1:r2], SCB[r1:r2], best[r1:r2] = Q, scale, err
                    continue
                better = err < best[r1:r2]
                CB[r1:r2] = torch.where(better.view(-1, 1), Q.to(torch.int8), CB[r1:r2])
                SCB[r1:r2], best[r1:r2] = torch.where(better, scale, SCB[r1:r2]), torch.where(better, err, best[r1:r2])
        del Qt
    return CB[:, torch.argsort(perm)], SCB
