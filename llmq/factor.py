"""GPTQ's inverse Hessian factor U (upper Cholesky factor of H^-1), with one [in, in] float64 matrix alive.

The straightforward route (Cholesky of H, cholesky_inverse, Cholesky again) holds two float64 matrices beside
H's float32 copies, and a row-major `out=` makes LAPACK work on a column-major copy: 6 x in^2 x 4 bytes at
once, 18.4 GiB for a Llama-3-70B down_proj (28672 inputs). Here: J P J (J reverses the order) = R R^T gives
P = (J R J)(J R J)^T, so U = (J R J)^-1 = J R^-1 J; one Cholesky and one triangular inverse, both in place on
a column-major view, the matrix built from H and flipped into the float32 result in ~16 MiB pieces. As
accurate in float64 (|U^T U P - I| 2.4e-12 against 2.2e-12 on an 8192-input Hessian); the float32 U is the old
route's bit for bit up to a few thousand inputs and differs by an ulp in 1.3e-4 of its entries at 8192
(docs/large-models.md).
"""

from __future__ import annotations

import logging

import torch

from .errors import NumericalError

log = logging.getLogger(__name__)


def scaled(H: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, s: torch.Tensor | None,
           dead: torch.Tensor | None) -> torch.Tensor:
    """float32 H[rows][:, cols] / (s_rows s_cols), zero on dead rows and columns (masks over H's order)."""
    B = H[rows[:, None], cols[None, :]]  # one gather: H[rows][:, cols] would hold a second copy
    if s is not None:
        B.div_(s[rows][:, None]).div_(s[cols][None, :])
    if dead is not None:
        B[dead[rows], :] = 0
        B[:, dead[cols]] = 0
    return B


def _invert_lower_(L: torch.Tensor, block: int = 128) -> torch.Tensor:
    """L <- L^-1 for a lower triangular L, in place (LAPACK's blocked trtri: each block row needs only the
    inverted blocks above it); temporaries of [block, n], no second [n, n] matrix."""
    n = L.shape[0]
    for c in range(0, n, block):
        e = min(c + block, n)
        D = L[c:e, c:e]
        Dinv = torch.linalg.solve_triangular(D, torch.eye(e - c, dtype=L.dtype, device=L.device), upper=False)
        if c:
            L[c:e, :c] = -(Dinv @ (L[c:e, :c] @ L[:c, :c]))
        D.copy_(Dinv)
    return L


def inverse_cholesky(H: torch.Tensor, damp: float, *, order: torch.Tensor | None = None,
                     in_scale: torch.Tensor | None = None, diag: torch.Tensor | None = None,
                     dead: torch.Tensor | None = None, tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor U of (P + d I)^-1, float32, for P = D H D permuted by `order` (D = diag(1 / s),
    `dead` inputs' rows and columns zero, the diagonal `diag` in H's order, else H's); d = damp * mean(diag P),
    x10 per failed try. One float64 [in, in] matrix, then the float32 U beside it (see the module docstring)."""
    n = H.shape[0]
    order = torch.arange(n, device=H.device) if order is None else order
    rev = order.flip(0)
    diag = H.diagonal() if diag is None else diag
    base = float(diag[order].double().mean())
    rows = max(1, 2**21 // n)  # pieces of ~16 MiB
    d = damp * base
    for _ in range(tries):
        A = torch.empty(n, n, dtype=torch.float64, device=H.device)
        for a in range(0, n, rows):  # row-major J P J, read as the column-major J P^T J that LAPACK factors in
            A[a:a + rows] = scaled(H, rev[a:a + rows], rev, in_scale, dead)  # place; its lower triangle is P's
        A = A.mT
        A.diagonal().copy_(diag[rev]).add_(d)
        info = torch.linalg.cholesky_ex(A, out=(A, torch.empty((), dtype=torch.int32, device=A.device)))[1]
        if info == 0:
            _invert_lower_(A)
            U = torch.empty(n, n, dtype=torch.float32, device=H.device)
            for a in range(0, n, rows):  # finite checked piece by piece: isfinite on A would copy it
                U[a:a + rows] = A[max(0, n - a - rows):n - a].flip(0, 1)
                if not torch.isfinite(U[a:a + rows]).all():
                    break
            else:
                return U
            del U
        del A
        log.warning("GPTQ: Hessian not positive definite with damping %.3g; retrying with more", d)
        d = max(10 * d, 1e-6 * base)
    raise NumericalError(f"GPTQ: the Hessian stays singular after {tries} dampings (last {d:.3g}); "
                         "calibrate on more tokens or use round-to-nearest")
