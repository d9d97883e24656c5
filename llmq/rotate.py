"""Rotate the residual stream by a fixed orthogonal matrix Q (QuaRot's R1, Ashkboos et al. 2024), folded into
the weights: a float model computes the same logits, and the checkpoint is an ordinary one of its family.

Why: W8A8 quantizes each token's activations with one scale (its abs-max). A few residual channels carry
outliers 10-100x the rest, so most channels of a token get a handful of int8 levels. x -> x Q with a
randomized Hadamard Q spreads every channel over all of them; smoothing then has little left to move.

How, per decoder layer (pre-norm RMSNorm families only, see ROTATABLE):
- each norm's multipliers m (w, or Gemma's 1 + w) move into its consumers' input columns, W <- W diag(m), and
  the norm keeps multipliers 1; RMSNorm(x Q) = RMSNorm(x) Q because Q keeps the norm of x;
- consumers of the stream (q/k/v, gate/up; lm_head) get W <- W Q; writers (o_proj, down_proj) W <- Q^T W
  and b <- b Q; the embedding E <- E Q;
- each attention head's values by a randomized Hadamard H of head_dim (QuaRot's R2): v_proj's rows of a head
  W <- H^T W, b <- b H, o_proj's input columns of every query head W <- W H (one H for all heads, so GQA
  needs nothing more); attention mixes tokens, not channels, so o_proj reads o H and undoes it.
A tied lm_head cannot stay tied (the final norm's multipliers fold into it but not into the embedding), so it
is untied: one more vocab x hidden matrix in the checkpoint, which the log and the report state.
Families that normalise a sublayer's output before the residual add (Gemma 2/3's post-norms) and LayerNorm
families (mean subtraction, biases) have no exact fold and are refused.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ConfigError, UnsupportedArchitecture
from .hadamard import rotation
from .quantize import FP16_MAX, check_finite_weights, nonfinite_weight
from .smooth import smooth_targets

log = logging.getLogger(__name__)

ROTATABLE = ("cwm", "ernie4_5", "exaone", "gemma", "glm", "granite", "granite_swa", "helium", "hunyuan_v1_dense",
             "internlm3", "iquestcoder", "llama", "ministral", "ministral3", "mistral", "phi3", "qwen2",
             "qwen3", "seed_oss", "smollm3", "vaultgemma")
_CHUNK = 4096  # rows (or columns) of a weight rotated at once in float64


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


def _heads(model: nn.Module) -> list[tuple[str, tuple[int, int], str]]:
    """Per layer (v_proj or the fused linear holding v, its v rows [lo, hi), o_proj), from the v_o groups."""
    return [(t.prev_name, t.prev_rows or (0, model.get_submodule(t.prev_name).weight.shape[0]), t.linear_names[0])
            for t in smooth_targets(model) if t.group == "v_o"]


def _head_dim(model: nn.Module) -> int:
    cfg = model.config.get_text_config()
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rotate_heads_(v: nn.Linear, rows: tuple[int, int], o: nn.Linear, h: torch.Tensor) -> None:
    """R2 for one layer: v's rows per head W <- H^T W (bias b <- b H), o's input columns per head W <- W H."""
    d, (lo, hi) = h.shape[0], rows
    hd = h.to(v.weight.device)
    w = v.weight[lo:hi].double().reshape(-1, d, v.weight.shape[1])
    v.weight[lo:hi] = torch.einsum("ji,hjk->hik", hd, w).reshape(hi - lo, -1).to(v.weight.dtype)
    if v.bias is not None:
        v.bias[lo:hi] = (v.bias[lo:hi].double().reshape(-1, d) @ hd).reshape(-1).to(v.bias.dtype)
    wo = o.weight.double().reshape(o.weight.shape[0], -1, d)
    o.weight.copy_((wo @ hd).reshape(o.weight.shape).to(o.weight.dtype))


def _head_bound(v: nn.Linear, rows: tuple[int, int], o: nn.Linear, d: int, m: torch.Tensor) -> float:
    """An entry of H^T (W_v diag(m)) Q or of Q^T W_o H is at most the spectral norm of its head's block."""
    lo, hi = rows
    wv = (v.weight[lo:hi].double() * m.to(v.weight.device)).reshape(-1, d, v.weight.shape[1])
    wo = o.weight.double().reshape(o.weight.shape[0], -1, d).transpose(0, 1)
    bias = 0.0 if v.bias is None else v.bias[lo:hi].double().reshape(-1, d).norm(dim=1).max().item()
    return max(torch.linalg.matrix_norm(wv, ord=2).max().item(), torch.linalg.matrix_norm(wo, ord=2).max().item(),
               bias)


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
    readers = {n: (norm, k) for norm, k, names in stream if norm is not None for n in names}
    d = _head_dim(model)
    for v, rows, o in _heads(model):
        seen.append((_head_bound(model.get_submodule(v), rows, model.get_submodule(o), d,
                                 _multipliers(*readers[v])), o))
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
    d = _head_dim(model)
    h, _ = rotation(d, seed + 1)
    for v, rows, o in _heads(model):
        _rotate_heads_(model.get_submodule(v), rows, model.get_submodule(o), h)
    name = nonfinite_weight(model)
    if name is not None:
        dtype = str(model.get_parameter(name).dtype).removeprefix("torch.")
        raise ConfigError(f"rotating the residual stream overflowed {dtype} in {name} (weights or norm "
                          "multipliers near the dtype's limit); quantize with --no-rotate")
    log.info("rotate: residual stream of %d layers rotated by a %d x %d %s matrix, each head's values by a "
             "%d x %d one", len(model.get_decoder().layers), n, n, kind, d, d)
    return {"kind": kind, "size": n, "seed": seed, "untied_lm_head_params": untied, "head_dim": d}
