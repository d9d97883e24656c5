"""Rotate the residual stream by a fixed orthogonal matrix Q (QuaRot's R1, Ashkboos et al. 2024), folded into
the weights: a float model computes the same logits, and the checkpoint is an ordinary one of its family.

Why: W8A8 quantizes each token's activations with one scale (its abs-max). A few residual channels carry
outliers 10-100x the rest, so most channels of a token get a handful of int8 levels. x -> x Q with a
randomized Hadamard Q spreads every channel over all of them; smoothing then has little left to move.

How, per decoder layer (pre-norm RMSNorm families only, see ROTATABLE):
- each norm's multipliers m (w, or Gemma's 1 + w) move into its consumers' input columns, W <- W diag(m), and
  the norm keeps multipliers 1; RMSNorm(x Q) = RMSNorm(x) Q because Q keeps the norm of x;
- consumers of the stream (q/k/v, gate/up; lm_head) get W <- W Q; writers (o_proj, down_proj) W <- Q^T W
  and b <- b Q; the embedding E <- E Q.
A tied lm_head cannot stay tied (the final norm's multipliers fold into it but not into the embedding), so it
is untied: one more vocab x hidden matrix in the checkpoint, which the log and the report state.
Families that normalise a sublayer's output before the residual add (Gemma 2/3's post-norms) and LayerNorm
families (mean subtraction, biases) have no exact fold and are refused.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
from torch import nn

from .errors import ConfigError, UnsupportedArchitecture
from .quantize import FP16_MAX, check_finite_weights, nonfinite_weight
from .smooth import smooth_targets

log = logging.getLogger(__name__)

ROTATABLE = ("cwm", "ernie4_5", "exaone", "gemma", "glm", "granite", "granite_swa", "helium", "hunyuan_v1_dense",
             "internlm3", "iquestcoder", "llama", "ministral", "ministral3", "mistral", "phi3", "qwen2",
             "qwen3", "seed_oss", "smollm3", "vaultgemma")
_CHUNK = 4096  # rows (or columns) of a weight rotated at once in float64


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    squares = {(i * i) % q for i in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n by Paley's constructions (q prime): I, n = q + 1, q = 3 mod 4; II,
    n = 2(q + 1), q = 1 mod 4. None if neither applies."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return s + torch.eye(n, dtype=torch.float64)
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


@lru_cache(maxsize=8)
def hadamard(n: int) -> torch.Tensor | None:
    """An n x n matrix of +-1 with H H^T = n I: Sylvester (2^k) times a Paley block; None when this small
    catalogue has none (it covers 2^k times 12, 20, 28, 36, 44, 60, 68, 72, ... e.g. 576, 640, 896, 3584)."""
    p = n & -n  # the largest power of 2 dividing n
    while p >= 1:
        m = n // p
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if base is not None:
            return torch.kron(base, _sylvester(p))
        p //= 2
    return None


def rotation(n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """An n x n orthogonal float64 matrix and its kind: a Hadamard matrix with random signs on its rows
    (D H / sqrt(n)), or, where `hadamard` has none for n, a random orthogonal matrix (QR of a Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is None:
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)), "random orthogonal"
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    return signs[:, None] * h / n**0.5, "randomized Hadamard"


def check_rotatable(model_type: str | None) -> None:
    if model_type not in ROTATABLE:
        raise UnsupportedArchitecture(
            f"--rotate supports {', '.join(ROTATABLE)}, not {model_type!r}: the rotation folds into the weights "
            "only where every sublayer reads the residual stream through an RMSNorm and writes it back "
            "unnormalised (Gemma 2/3 normalise sublayer outputs; OPT, GPT-2, GPT-NeoX, BLOOM use LayerNorm); "
            "drop --rotate")


def auto_rotate(model: nn.Module, recipe, scales=None) -> tuple[bool, str]:
    """What `quantization.rotate: auto` (the default) means for this in-memory model, and why (one phrase).

    On only where the rotation costs no bytes and cannot ship a worse model: W8A8 or weight-only with
    `--alpha auto` and its guard (which then also quantizes the unrotated model and ships whichever has the
    lower held-out KL, llmq/guard.py), a family the rotation folds into, an lm_head of its own (a tied one
    would be untied: vocab x hidden more 16-bit parameters, which only `--rotate` asks for), every weight
    resident, and in float16 only where the folded weights provably fit it (rotated_bound). With --act-scales
    it follows what they were measured on. Measured (docs/benchmarks.md, "Rotation"): guard held-out KL -32%
    on SmolLM2, -44% on Qwen2.5."""
    q, sm = recipe.quantization, recipe.smoothing
    if scales is not None:
        return scales.rotated, f"--act-scales were measured {'with' if scales.rotated else 'without'} a rotation"
    if q.method not in ("smoothquant", "weight-only"):
        return False, f"not measured with {q.method}"
    if sm.alpha != "auto" or sm.guard_windows <= 0:
        return False, ("only with --alpha auto and its guard, which also quantizes the unrotated model and "
                       "ships the one with the lower held-out KL")
    model_type = model.config.model_type
    if model_type not in ROTATABLE:
        return False, f"{model_type} has no exact fold (--rotate supports {', '.join(ROTATABLE)})"
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight.data_ptr() == emb.weight.data_ptr():
        return False, ("lm_head is tied to the embedding and would be untied (vocab x hidden more 16-bit "
                       "parameters); --rotate asks for that")
    if any(p.device.type == "meta" for p in model.parameters()):
        return False, "some weights are offloaded"
    why = "untied lm_head, so no extra bytes; the guard compares it with the unrotated model"
    if emb.weight.dtype == torch.float16:  # each norm's multipliers fold into the weights: they can pass 65504
        bound, name = rotated_bound(model)
        if not bound <= FP16_MAX:
            return False, (f"float16 could overflow where the norms fold into the weights (bound {bound:.3g} "
                           f"in {name}, above 65504)")
        why += f"; float16 cannot overflow (every rotated weight <= {bound:.3g})"
    return True, why


def unguarded_rotate(rotate: bool | str, scales=None) -> bool:
    """What `quantization.rotate` means where no guard checks the choice (llmq.quantize_model_, sequential
    mode): true/false as given; auto follows the basis --act-scales were measured in, else off."""
    return rotate is True or (rotate == "auto" and scales is not None and scales.rotated)


def _rotate_in_(w: torch.Tensor, q: torch.Tensor, m: torch.Tensor | None = None) -> None:
    """w [out, in] <- (w diag(m)) Q, in float64 chunks of rows, stored in w's dtype."""
    qd = q.to(w.device)
    for i in range(0, w.shape[0], _CHUNK):
        x = w[i:i + _CHUNK].double()
        if m is not None:
            x = x * m.to(w.device)
        w[i:i + _CHUNK] = (x @ qd).to(w.dtype)


def _rotate_out_(lin: nn.Linear, q: torch.Tensor) -> None:
    """A writer of the stream: weight [hidden, in] <- Q^T weight, bias <- bias Q."""
    w, qd = lin.weight, q.to(lin.weight.device)
    for j in range(0, w.shape[1], _CHUNK):
        w[:, j:j + _CHUNK] = (qd.T @ w[:, j:j + _CHUNK].double()).to(w.dtype)
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ qd).to(lin.bias.dtype))


def _multipliers(norm: nn.Module, kind: str) -> torch.Tensor:
    """The norm's per-channel multipliers, float64 (w, or Gemma's 1 + w)."""
    if getattr(norm, "bias", None) is not None:
        raise UnsupportedArchitecture(f"{type(norm).__name__} has a bias; --rotate needs bias-free RMSNorms")
    return norm.weight.detach().double() + (1.0 if kind == "gemma_norm" else 0.0)


def _take_norm(norm: nn.Module, kind: str) -> torch.Tensor:
    """The norm's multipliers, which it then stops applying (w = 1, Gemma w = 0)."""
    m = _multipliers(norm, kind)
    norm.weight.fill_(0.0 if kind == "gemma_norm" else 1.0)
    return m


def _norms(w: torch.Tensor, dim: int, m: torch.Tensor | None = None) -> float:
    """The largest 2-norm of w's rows (dim=1) or columns (dim=0), w's columns scaled by m first; in chunks."""
    n = w.shape[1 - dim]
    best = 0.0
    for i in range(0, n, _CHUNK):
        x = (w[i:i + _CHUNK] if dim == 1 else w[:, i:i + _CHUNK]).double()
        if m is not None:
            x = x * m.to(w.device)
        best = max(best, x.norm(dim=dim).max().item())
    return best


def _stream(model: nn.Module) -> list[tuple[nn.Module | None, str | None, tuple[str, ...]]]:
    """The residual stream's readers and writers, one smoothing group at a time over every layer: (norm, its
    kind, linear names) for a group that reads the stream through a norm (attn, mlp: q/k/v, gate/up), and
    (None, None, names) for one that writes it (v_o, up_down: o_proj, down_proj). rotate_ and rotated_bound
    walk the same list."""
    targets = smooth_targets(model)
    if {t.group for t in targets} != {"attn", "v_o", "mlp", "up_down"} or len(targets) != 4 * len(
            model.get_decoder().layers):  # a layer left out would be a silently different model
        raise UnsupportedArchitecture(f"{model.config.model_type}: --rotate needs the attn, v_o, mlp and "
                                      "up_down groups of llmq/arch.py in every layer; drop --rotate")
    return [(model.get_submodule(t.prev_name), t.prev_kind, t.linear_names) if t.group in ("attn", "mlp")
            else (None, None, t.linear_names) for t in targets]


def _final_norm(model: nn.Module, stream: list) -> tuple[nn.Module, str]:
    """The decoder's final norm and its kind (that of the layers' norms, read off `stream`), which folds into
    lm_head."""
    kind = next(k for norm, k, _ in stream if norm is not None)
    return model.get_decoder().norm, kind


@torch.no_grad()
def rotated_bound(model: nn.Module) -> tuple[float, str]:
    """(b, name): every entry rotate_ would write has |entry| <= b, reached at most in `name`. Q is orthogonal,
    so each entry of (W diag(m)) Q is at most the 2-norm of its row of W diag(m), each of Q^T W at most its
    column's, each of b Q at most |b|; the embedding's rows keep their norms. Costs one read of the weights."""
    check_rotatable(model.config.model_type)
    seen: list[tuple[float, str]] = []
    stream = _stream(model)
    for norm, kind, names in stream:
        m = None if norm is None else _multipliers(norm, kind)
        for n in names:
            lin = model.get_submodule(n)
            if norm is not None:  # a reader: rows of W diag(m)
                seen.append((_norms(lin.weight, 1, m), n))
                continue
            seen.append((_norms(lin.weight, 0), n))  # a writer: columns of W, and its bias
            if lin.bias is not None:
                seen.append((lin.bias.double().norm().item(), f"{n}.bias"))
    final, kind = _final_norm(model, stream)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    seen += [(_norms(head.weight, 1, _multipliers(final, kind)), "lm_head"),
             (_norms(emb.weight, 1), "the embedding")]
    return max(seen)


@torch.no_grad()
def rotate_(model: nn.Module, seed: int = 0) -> dict:
    """Rotate `model`'s residual stream in place (see the module docstring); returns what was done: the
    rotation's kind and size and the parameters an untied lm_head adds. Float logits are unchanged up to rounding
    in the model's dtype."""
    check_rotatable(model.config.model_type)
    check_finite_weights(model)  # inf/nan before: a damaged checkpoint, named as such; after: the rotation's
    cfg = model.config.get_text_config()
    n = cfg.hidden_size
    q, kind = rotation(n, seed)
    stream = _stream(model)
    final, final_kind = _final_norm(model, stream)
    for norm, norm_kind, names in stream:
        if norm is None:
            for name in names:
                _rotate_out_(model.get_submodule(name), q)
            continue
        m = _take_norm(norm, norm_kind)
        for name in names:
            _rotate_in_(model.get_submodule(name).weight, q, m)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    untied = 0
    if head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        untied = head.weight.numel()
        model.config.tie_word_embeddings = False
        cfg.tie_word_embeddings = False
        log.info("rotate: lm_head untied from the embedding (the final norm folds into it): +%.1fM parameters "
                 "(+%.1f MB at 16-bit)", untied / 1e6, untied * 2 / 1e6)
    _rotate_in_(head.weight, q, _take_norm(final, final_kind))
    _rotate_in_(emb.weight, q)
    name = nonfinite_weight(model)
    if name is not None:
        dtype = str(model.get_parameter(name).dtype).removeprefix("torch.")
        raise ConfigError(f"rotating the residual stream overflowed {dtype} in {name} (weights or norm "
                          "multipliers near the dtype's limit); quantize with --no-rotate")
    log.info("rotate: residual stream of %d layers rotated by a %d x %d %s matrix",
             len(model.get_decoder().layers), n, n, kind)
    return {"kind": kind, "size": n, "seed": seed, "untied_lm_head_params": untied}
