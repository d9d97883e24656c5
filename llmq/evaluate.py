"""`llmq eval`: perplexity, fidelity against a reference model, memory and speed -> `EvalResult`.

Perplexity protocol (the one place it is written; reports print it with the numbers filled in):
tokenize the whole text without special tokens and keep the first `max_tokens` tokens; split them into
non-overlapping windows of `seq_len` tokens (stride = `seq_len`); a partial last window is scored too if
it has >= 2 tokens. Each window is an independent sequence (no cache carried over). The first token of
each window is unscored, since it has no context, unless a BOS is inserted: with `bos` true, or "auto" (the
default) for a tokenizer that puts BOS before plain text itself (Gemma's, Llama's; llmq.data.bos_id), the
tokenizer's `bos_token_id` is prepended to each window as context and the first text token IS scored.
The NLL of each scored token comes from float32 log-softmax of the logits and is summed in float64;
perplexity = exp(total NLL / number of scored tokens).

Fidelity against a `reference` model, on the same windows and the same scored positions:
KL(P_ref || P_model) from float32 log-softmax, averaged over scored tokens, and top-1 agreement =
mean(argmax_ref == argmax_model). Tokens/s counts every token fed to the model (not only scored ones)
over the time of the model's forward passes alone (the reference's forwards are timed apart).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import Evaluation
from .errors import ConfigError, NumericalError
from .memory import PeakMemory, weight_bytes

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """One evaluation run. `tokens` = scored tokens; `seconds` = time in the model's forward passes."""

    perplexity: float
    nll: float  # mean NLL per scored token (nats)
    tokens: int
    seq_len: int
    windows: int
    max_tokens: int | None
    bos: bool
    peak_memory_bytes: int
    peak_memory_kind: str
    peak_reserved_bytes: int | None
    baseline_memory_bytes: int
    weight_memory_bytes: int
    tokens_per_second: float
    seconds: float
    device: str
    dtype: str
    protocol: str
    data: str | None = None
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    reference: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the first device of an accelerate device map, else the first parameter's."""
    dmap = getattr(model, "hf_device_map", None)
    if dmap:
        first = next(iter(dmap.values()))
        if first not in ("disk", "meta"):
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype_name(model: torch.nn.Module) -> str:
    names = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return "+".join(names) or "none"


def _vocab_size(model: torch.nn.Module) -> int | None:
    get = getattr(model, "get_output_embeddings", None)
    weight = getattr(get(), "weight", None) if get is not None else None
    return int(weight.shape[0]) if weight is not None else None


def check_same_vocab(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """ConfigError unless both models score the same vocabulary (KL/top-1 compare their logits)."""
    a, b = _vocab_size(model), _vocab_size(reference)
    if a is not None and b is not None and a != b:
        raise ConfigError(f"the model has a vocabulary of {a} tokens and the reference {b}: KL and top-1 "
                          "compare models that share a tokenizer; give another --reference")


_NONFINITE_HINT = ("if float16 overflowed, evaluate with --dtype float32 or quantize with --storage-dtype "
                   "bfloat16; else the weights hold inf/nan (a broken quantization)")


def _check_finite(logits: torch.Tensor, i: int, who: str) -> None:
    if not torch.isfinite(logits).all():
        raise NumericalError(
            f"non-finite logits in window {i} from the {who} (dtype {logits.dtype}); " + _NONFINITE_HINT)


def _nll(logits: torch.Tensor, target: torch.Tensor, i: int, *, normalized: bool = False) -> float:
    """Summed NLL of one window (`normalized`: `logits` are already log-probabilities).

    cross_entropy (= log_softmax + gather) rather than separate passes: on CPU every extra pass over the
    [seq_len, vocab] logits costs several % of a 135M model's forward. nan or +inf anywhere in a scored
    row makes that row's NLL non-finite, so checking the NLL replaces an isfinite pass (-inf off the
    target is a legitimate zero probability)."""
    if normalized:
        rows = -logits.gather(1, target[:, None])
    else:
        rows = F.cross_entropy(logits.float(), target, reduction="none")
    total = rows.sum(dtype=torch.float64).item()
    if not math.isfinite(total):
        raise NumericalError(
            f"non-finite logits in window {i} (NLL {total}, dtype {logits.dtype}); " + _NONFINITE_HINT)
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def protocol_text(*, n_ids: int, max_tokens: int | None, seq_len: int, windows: list[torch.Tensor],
                  bos_id: int | None, scored: int, data: str | None) -> str:
    """The perplexity protocol as one paragraph with this run's numbers."""
    last = windows[-1].numel()
    partial = f"the last has {last}" if last != seq_len else "all full"
    if sum(w.numel() for w in windows) < n_ids:
        partial += ", a 1-token remainder is not scored"
    bos = (f"BOS (id {bos_id}) prepended to each window as context, so every text token is scored"
           if bos_id is not None else "no BOS inserted, so the first token of each window is unscored")
    source = f"{data}, tokenized without special tokens" if data else "the given token ids"
    return (f"Perplexity over {source}: first {n_ids} tokens kept (max_tokens={max_tokens}); "
            f"{len(windows)} non-overlapping windows of {seq_len} tokens (stride {seq_len}; {partial}), "
            "each an independent sequence with no cache "
            f"carried over; {bos}; {scored} tokens scored; perplexity = exp(total NLL / scored tokens), "
            "NLL from float32 log-softmax summed in float64.")


# logits scored at once (rows x vocab): the float32 temporaries of log-softmax and KL stay ~16 MB each, small
# beside the model's own logits, so computing KL does not weigh on the peak memory of the model measured
_CHUNK_ELEMENTS = 2**22


@torch.inference_mode()
def evaluate_ids(model: torch.nn.Module, ids: torch.Tensor, seq_len: int, *, bos_id: int | None = None,
                 reference: Any = None, record: Any = None, progress: bool = True,
                 max_tokens: int | None = None, data: str | None = None) -> EvalResult:
    """Score 1-D token `ids` with the protocol in this module's docstring (BOS prepended if `bos_id`).

    `reference`: a model run beside this one on each window (both resident), or a `llmq.compare.ReferenceLogits`
    that a reference's own evaluation filled (only this model resident). `record`: a ReferenceLogits that
    receives this model's logits, window by window. Logits are scored `_CHUNK_ELEMENTS` at a time (whole rows),
    so the float32 temporaries (log-softmax, KL terms) stay small beside the logits themselves."""
    from tqdm.auto import tqdm

    from .data import eval_windows

    ids = ids.reshape(-1).long()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = eval_windows(ids, seq_len)
    if model.training:
        log.warning("evaluating a model in training mode (dropout active); call model.eval() first")
    live = isinstance(reference, torch.nn.Module)
    if live:
        check_same_vocab(model, reference)
    device = input_device(model)
    ref_device = input_device(reference) if live else None
    bos = torch.tensor([bos_id], dtype=torch.long) if bos_id is not None else None

    nll = 0.0
    kl = 0.0
    agree = 0
    scored = 0
    fed = 0
    seconds = 0.0
    with PeakMemory(device) as mem:
        for i, w in enumerate(tqdm(windows, desc="eval", unit="win", disable=not progress)):
            x = torch.cat([bos, w]) if bos is not None else w
            x_dev = x.to(device)
            _sync(device)
            t0 = time.perf_counter()
            # the last position predicts beyond the window: drop it
            logits = model(x_dev[None], use_cache=False).logits[0, :-1]
            _sync(device)
            seconds += time.perf_counter() - t0
            target = x_dev[1:].to(logits.device)
            scored += target.numel()
            fed += x.numel()
            if record is not None:
                record.append(i, x, logits)
            ref_logits = None
            if live:
                ref_logits = reference(x.to(ref_device)[None], use_cache=False).logits[0, :-1]
                _check_finite(ref_logits, i, "reference")
            elif reference is not None:
                reference.check(i, x, logits.shape[-1])
            step = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
            for a in range(0, target.numel(), step):
                rows = slice(a, a + step)
                if reference is None:
                    nll += _nll(logits[rows], target[rows], i)
                    continue
                logp = F.log_softmax(logits[rows].float(), dim=-1)
                nll += _nll(logp, target[rows], i, normalized=True)
                ref = ref_logits[rows] if live else reference.rows(i, a, a + logp.shape[0])
                ref_logp = F.log_softmax(ref.to(logp.device).float(), dim=-1)
                kl += F.kl_div(logp, ref_logp, reduction="none", log_target=True).sum(dtype=torch.float64).item()
                agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum().item())
                del logp, ref_logp, ref
            del logits, ref_logits

    mean_nll = nll / scored
    return EvalResult(
        perplexity=math.exp(mean_nll), nll=mean_nll, tokens=scored, seq_len=seq_len, windows=len(windows),
        max_tokens=max_tokens, bos=bos_id is not None,
        peak_memory_bytes=mem.peak_bytes, peak_memory_kind=mem.kind, peak_reserved_bytes=mem.reserved_bytes,
        baseline_memory_bytes=mem.baseline_bytes, weight_memory_bytes=weight_bytes(model),
        tokens_per_second=fed / seconds if seconds > 0 else float("inf"), seconds=seconds,
        device=str(device), dtype=_dtype_name(model),
        protocol=protocol_text(n_ids=ids.numel(), max_tokens=max_tokens, seq_len=seq_len, windows=windows,
                               bos_id=bos_id, scored=scored, data=data),
        data=data,
        kl_divergence=kl / scored if reference is not None else None,
        top1_agreement=agree / scored if reference is not None else None,
    )


def eval_ids(tokenizer: Any, cfg: Evaluation) -> tuple[torch.Tensor, int | None]:
    """The token ids `cfg` evaluates (first `cfg.max_tokens` of `cfg.data`) and the BOS id to prepend to each
    window (llmq.data.bos_id of `cfg.bos`), or None."""
    from .data import bos_id, load_text, tokenize

    bos = bos_id(tokenizer, cfg.bos)
    text = load_text(cfg.data, purpose="evaluation")
    return tokenize(tokenizer, text, max_tokens=cfg.max_tokens), bos


def evaluate(model: torch.nn.Module, tokenizer: Any, cfg: Evaluation, *,
             reference: torch.nn.Module | None = None, reference_name: str | None = None,
             progress: bool = True) -> EvalResult:
    """Load `cfg.data`, tokenize it and score it with `evaluate_ids` (a `reference` model stays resident
    beside `model`; llmq.compare.evaluate_pair evaluates them one at a time)."""
    from .data import bos_id
    from .load import check_seq_len

    with_bos = bos_id(tokenizer, cfg.bos) is not None
    for m in (model, reference):
        if m is not None:
            check_seq_len(m, cfg.seq_len, "evaluation.seq_len (--seq-len)", with_bos)  # before tokenizing
    ids, bos = eval_ids(tokenizer, cfg)
    result = evaluate_ids(model, ids, cfg.seq_len, bos_id=bos, reference=reference, progress=progress,
                          max_tokens=cfg.max_tokens, data=cfg.data)
    if reference is not None:
        ref_cfg = getattr(reference, "config", None)
        result.reference = reference_name or getattr(ref_cfg, "_name_or_path", None)
    return result


def _fmt(v: float | int | str | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: dict[str, EvalResult]) -> str:
    """Side-by-side table, one column per run (e.g. {"fp32": r0, "int8": r1})."""
    mb = 1024 * 1024
    rows: list[tuple[str, list[str]]] = [
        ("perplexity", [_fmt(r.perplexity, ".4f") for r in results.values()]),
        ("KL vs ref (nats/tok)", [_fmt(r.kl_divergence, ".3e") for r in results.values()]),
        ("top-1 agreement", [_fmt(r.top1_agreement, ".2%") for r in results.values()]),
        ("weights MB", [_fmt(r.weight_memory_bytes / mb, ".1f") for r in results.values()]),
        ("peak MB", [_fmt(r.peak_memory_bytes / mb, ".1f") for r in results.values()]),
        ("peak above start MB",
         [_fmt((r.peak_memory_bytes - r.baseline_memory_bytes) / mb, ".1f") for r in results.values()]),
        ("memory measure", [r.peak_memory_kind for r in results.values()]),
        ("tokens/s", [_fmt(r.tokens_per_second, ".1f") for r in results.values()]),
        ("scored tokens", [str(r.tokens) for r in results.values()]),
        ("device", [r.device for r in results.values()]),
        ("dtype", [r.dtype for r in results.values()]),
    ]
    table = [["", *results], *([name, *cells] for name, cells in rows)]
    widths = [max(len(row[j]) for row in table) for j in range(len(table[0]))]
    lines = []
    for row in table:
        cells = [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join([row[0].ljust(widths[0]), *cells]))
    return "\n".join(lines)
