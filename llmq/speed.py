"""Decode speed: what a user feels when generating, one token at a time with a KV cache, at batch 1.

Protocol (written once; `DecodeResult.protocol` repeats it with numbers): the prompt is the first
`prompt_tokens` tokens of the text `data` (no special tokens, as llmq/evaluate.py). `model.generate` runs
greedy with the KV cache and `min_new_tokens = max_new_tokens = new_tokens` (EOS cannot end a run early).
A streamer stamps the time (after a device sync) at the prompt and each new token: prefill = prompt ->
first new token; decode = first -> last new token, per token. Each model runs `warmup` untimed generations,
then `repeats` timed ones, interleaved across models (order reversed every other round), so a ratio is the
median of per-round ratios of back-to-back runs. Reported: medians over the timed runs.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import OFFLINE_TEXT
from .errors import ConfigError, DataError
from .memory import PeakMemory, weight_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decode:
    """Settings of a decode-speed measurement (see the module docstring)."""

    data: str = OFFLINE_TEXT
    prompt_tokens: int = 512
    new_tokens: int = 128
    repeats: int = 5
    warmup: int = 1

    def __post_init__(self) -> None:
        for name, low in (("prompt_tokens", 1), ("new_tokens", 2), ("repeats", 1), ("warmup", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"decode.{name} must be an integer >= {low}, got {v!r}")
        if not self.data:
            raise ConfigError("decode.data must name a text source, e.g. llmq:wiki")


@dataclass
class DecodeResult:
    """One model's decode measurement; seconds and tokens/s are medians over the timed runs."""

    prompt_tokens: int
    new_tokens: int
    repeats: int
    warmup: int
    prefill_seconds: float
    prefill_tokens_per_second: float
    decode_seconds_per_token: float
    decode_tokens_per_second: float
    generate_seconds: float  # the whole generate() call
    runs: list[dict[str, float]]  # per timed run: prefill_s, decode_s_per_token, generate_s
    peak_memory_bytes: int  # highest over the timed runs (CUDA allocator, or process RSS on CPU)
    baseline_memory_bytes: int
    peak_memory_kind: str
    weight_memory_bytes: int
    device: str
    dtype: str
    generated: list[int]  # the greedy continuation of the first timed run
    deterministic: bool  # every timed run produced the same tokens
    data: str | None = None
    int8_method: str | None = None
    protocol: str = ""
    ratios: dict[str, float] = field(default_factory=dict)  # filled by compare_decode: vs another model

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def int8_method(model: torch.nn.Module) -> str | None:
    """Which llmq method a bitsandbytes int8 model corresponds to, from its quantization_config threshold
    (llmq/quantize.py: 0 = smoothquant, tiny positive = weight-only, otherwise llm-int8); None if not int8."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None
    qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
    if not qc.get("load_in_8bit"):
        return None
    t = float(qc.get("llm_int8_threshold", 6.0))
    return "smoothquant" if t == 0 else ("weight-only" if t <= 1e-3 else "llm-int8")


def _check_length(models: Any, cfg: Decode) -> None:
    from .load import check_seq_len

    for m in models:
        check_seq_len(m, cfg.prompt_tokens + cfg.new_tokens, "decode prompt + new tokens (--decode-prompt-tokens "
                      "+ --decode-new-tokens)")


def prompt_ids(tokenizer: Any, cfg: Decode) -> torch.Tensor:
    """The first `cfg.prompt_tokens` tokens of `cfg.data`; DataError if the text is shorter."""
    from .data import load_text, tokenize

    ids = tokenize(tokenizer, load_text(cfg.data, "evaluation"), max_tokens=cfg.prompt_tokens)
    if ids.numel() < cfg.prompt_tokens:
        raise DataError(f"{cfg.data!r} has {ids.numel()} tokens, fewer than decode.prompt_tokens "
                        f"({cfg.prompt_tokens}); use a shorter prompt or a longer text")
    return ids


def _timed_generate(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[dict[str, float], list]:
    """One greedy generate() with a KV cache: ({prefill_s, decode_s_per_token, generate_s}, new token ids)."""
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    from .evaluate import input_device

    device = input_device(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            sync(device)
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = Clock()
    gen = getattr(model, "generation_config", None)
    eos, pad = getattr(gen, "eos_token_id", None), getattr(gen, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if isinstance(eos, list) and eos else eos)
    cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           use_cache=True, eos_token_id=eos, pad_token_id=pad)
    x = ids.reshape(1, -1).to(device)
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=cfg, streamer=clock)
    sync(device)
    total = time.perf_counter() - t0
    new = out[0, x.shape[1]:].tolist()
    if len(new) != new_tokens or len(clock.stamps) != new_tokens + 1:
        raise RuntimeError(f"generate() produced {len(new)} tokens and {len(clock.stamps) - 1} streamer calls, "
                           f"expected {new_tokens}: this transformers version streams differently")
    s = clock.stamps
    return {"prefill_s": s[1] - s[0], "decode_s_per_token": (s[-1] - s[1]) / (new_tokens - 1), "generate_s": total}, new


def _dtype_name(model: torch.nn.Module) -> str:
    names = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return "+".join(names) or "none"


def protocol_text(cfg: Decode, data: str | None, models: int) -> str:
    inter = f", interleaved across {models} models (order reversed every other round)" if models > 1 else ""
    return (f"Decode speed at batch 1: prompt = the first {cfg.prompt_tokens} tokens of "
            f"{data or 'the given ids'}; greedy generate() with a KV cache, exactly {cfg.new_tokens} new tokens "
            f"(min_new_tokens = max_new_tokens, so EOS cannot end a run early); {cfg.warmup} warm-up run(s), "
            f"then {cfg.repeats} timed runs{inter}; prefill = prompt to first new token, decode = the other "
            f"{cfg.new_tokens - 1} tokens; tokens/s from median times.")


@torch.inference_mode()
def compare_decode(models: Mapping[str, torch.nn.Module], ids: torch.Tensor, cfg: Decode, *,
                   data: str | None = None, progress: bool = False) -> dict[str, DecodeResult]:
    """Decode speed of each model on the same prompt `ids`, timed runs interleaved; see the module docstring.

    Each result's `ratios[name]` is its decode tokens/s over model `name`'s: the median of per-round ratios."""
    from tqdm.auto import tqdm

    from .evaluate import input_device

    if not models:
        raise ConfigError("compare_decode needs at least one model")
    # bitsandbytes warns on every int8 forward that non-float16 inputs are cast to float16 (the documented
    # W8A8 path): thousands of lines per generate(), and their printing would be timed too
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    names = list(models)
    for name in names:
        if models[name].training:
            log.warning("%s is in training mode (dropout active); call model.eval() first", name)
        for _ in range(cfg.warmup):
            _timed_generate(models[name], ids, cfg.new_tokens)
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    tokens: dict[str, list[list[int]]] = {n: [] for n in names}
    peaks: dict[str, list[PeakMemory]] = {n: [] for n in names}
    for r in tqdm(range(cfg.repeats), desc="decode", unit="round", disable=not progress):
        for name in names if r % 2 == 0 else names[::-1]:
            with PeakMemory(input_device(models[name])) as pm:
                run, new = _timed_generate(models[name], ids, cfg.new_tokens)
            runs[name].append(run)
            tokens[name].append(new)
            peaks[name].append(pm)
    out = {}
    for name in names:
        m, rs = models[name], runs[name]
        prefill = statistics.median(x["prefill_s"] for x in rs)
        per_tok = statistics.median(x["decode_s_per_token"] for x in rs)
        top = max(peaks[name], key=lambda p: p.peak_bytes)
        out[name] = DecodeResult(
            prompt_tokens=int(ids.numel()), new_tokens=cfg.new_tokens, repeats=cfg.repeats, warmup=cfg.warmup,
            prefill_seconds=prefill, prefill_tokens_per_second=ids.numel() / prefill,
            decode_seconds_per_token=per_tok, decode_tokens_per_second=1.0 / per_tok,
            generate_seconds=statistics.median(x["generate_s"] for x in rs), runs=rs,
            peak_memory_bytes=top.peak_bytes, baseline_memory_bytes=top.baseline_bytes,
            peak_memory_kind=top.kind, weight_memory_bytes=weight_bytes(m), device=str(input_device(m)),
            dtype=_dtype_name(m), generated=tokens[name][0],
            deterministic=all(t == tokens[name][0] for t in tokens[name]), data=data,
            int8_method=int8_method(m), protocol=protocol_text(cfg, data, len(names)))
    for name in names:
        out[name].ratios = {o: paired_ratio(out[name], out[o]) for o in names if o != name}
    return out


def decode_speed(model: torch.nn.Module, tokenizer: Any, cfg: Decode = Decode(), *,
                 progress: bool = False) -> DecodeResult:
    """Decode speed of one model on the first `cfg.prompt_tokens` tokens of `cfg.data`."""
    _check_length([model], cfg)
    return compare_decode({"model": model}, prompt_ids(tokenizer, cfg), cfg, data=cfg.data,
                          progress=progress)["model"]


def decode_report(model: torch.nn.Module, tokenizer: Any, cfg: Decode = Decode(), *,
                  reference: torch.nn.Module | None = None, progress: bool = False,
                  ) -> tuple[dict[str, DecodeResult], str | None]:
    """`llmq eval --decode`: the model (and the reference, interleaved) -> ({"model", "reference"}: results,
    the plain sentence of `speed_caveat` when int8 decodes slower than the reference, or is known to)."""
    models = {"model": model, **({"reference": reference} if reference is not None else {})}
    _check_length(models.values(), cfg)
    res = compare_decode(models, prompt_ids(tokenizer, cfg), cfg, data=cfg.data, progress=progress)
    r = res["model"]
    versus = f"the reference ({res['reference'].dtype})" if reference is not None else "16-bit"
    return res, speed_caveat(r.int8_method, torch.device(r.device).type, r.ratios.get("reference"), versus)


def paired_ratio(a: DecodeResult, b: DecodeResult, key: str = "decode_s_per_token") -> float:
    """a's tokens/s over b's: the median over rounds of b's time / a's time (runs made back to back)."""
    return statistics.median(y[key] / x[key] for x, y in zip(a.runs, b.runs, strict=True))


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many greedy tokens two continuations share before the first difference."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


_WHY = {
    "weight-only": "bitsandbytes dequantizes every int8 weight to 16/32-bit at every step (W8A16 saves memory, "
                   "not time)",
    "cuda": "at batch 1 bitsandbytes' int8 path adds quantize, int8-matmul and dequantize kernels per linear, "
            "more work than one 16-bit matmul when the GPU waits on weights anyway",
}


def speed_caveat(method: str | None, device_type: str, ratio: float | None = None,
                 versus: str = "16-bit") -> str | None:
    """A plain sentence when int8 decodes slower than `versus` (measured `ratio` < 1), or, unmeasured, where
    it is known to (weight-only everywhere, any bitsandbytes int8 at batch 1 on GPU); None otherwise."""
    if method is None:
        return None
    why = _WHY["weight-only"] if method == "weight-only" else (_WHY["cuda"] if device_type == "cuda" else None)
    if ratio is not None:
        if ratio >= 1.0:
            return None
        return (f"{method} int8 decodes at {ratio:.2f}x the tokens/s of {versus} here (measured, same process): "
                f"slower" + (f"; {why}." if why else "."))
    if why is None:
        return None
    return (f"{method} int8 is expected to decode slower than {versus} on {device_type}: {why}; measure the "
            "ratio with `llmq eval MODEL --decode --reference FP_MODEL`.")


def format_decode(results: Mapping[str, DecodeResult]) -> str:
    """Side-by-side decode table, one column per model (as llmq.evaluate.format_table)."""
    rows = [("decode tokens/s", [f"{r.decode_tokens_per_second:.1f}" for r in results.values()]),
            ("ms per new token", [f"{1e3 * r.decode_seconds_per_token:.1f}" for r in results.values()]),
            ("prefill tokens/s", [f"{r.prefill_tokens_per_second:.1f}" for r in results.values()]),
            ("generate s", [f"{r.generate_seconds:.2f}" for r in results.values()]),
            ("decode peak above start MB",
             [f"{(r.peak_memory_bytes - r.baseline_memory_bytes) / 2**20:.1f}" for r in results.values()]),
            ("dtype", [r.dtype for r in results.values()])]
    names = list(results)
    for other in names:
        cells = [f"{r.ratios[other]:.2f}x" if other in r.ratios else "-" for r in results.values()]
        if any(c != "-" for c in cells):
            rows.append((f"decode speed / {other}", cells))
    table = [["", *names], *([k, *v] for k, v in rows)]
    widths = [max(len(row[j]) for row in table) for j in range(len(table[0]))]
    return "\n".join("  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                                     strict=True))])
                     for row in table)
