"""A model against a reference (FP vs INT8), each measured with only itself in memory.

KL(P_ref || P_model) and top-1 agreement need the reference's whole distribution at every scored token:
20k tokens x a 49k vocabulary is 4 GB of float32, too much to hold, and holding the reference model beside
the one measured would put its weights into that model's peak memory. So `evaluate_pair` runs in two passes:

1. the reference is loaded and evaluated on its own (its perplexity, peak memory, speed); each window's
   logits, in the dtype the reference produced them, are appended to an anonymous temporary file (deleted
   even on a crash);
2. the reference is freed (and the freed heap returned to the OS), the model is loaded and evaluated; each
   window's reference logits are read back a few rows at a time (`evaluate._CHUNK_ELEMENTS`) into one
   reused buffer.

The file is written and read with plain `write`/`readinto`, never memory-mapped: mapped pages would count in
this process's resident set, while the page cache of an ordinary file does not. The numbers equal those of
running both models side by side: the same logits go through the same float32 log-softmax. The cost is
disk: rows x vocab x itemsize bytes in $TMPDIR (checked before the first write), and one read of it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .config import Evaluation, Recipe
from .errors import ConfigError, OutputError
from .evaluate import EvalResult, _vocab_size, eval_ids, evaluate_ids

log = logging.getLogger(__name__)


class ReferenceLogits:
    """One model's logits per evaluation window, in a temporary file; `rows` reads them back in slices."""

    def __init__(self, total_rows: int, folder: str | Path | None = None) -> None:
        self.total_rows = total_rows
        self.folder = Path(folder or tempfile.gettempdir())
        self.vocab: int | None = None
        self.dtype: torch.dtype | None = None
        try:
            self._file = tempfile.TemporaryFile(dir=self.folder)
        except OSError as e:
            raise OutputError(f"cannot create a temporary file in {str(self.folder)!r} for the reference's logits "
                              f"({e.strerror or e}); set TMPDIR to a writable folder") from None
        self._index: list[tuple[int, int, torch.Tensor]] = []  # (offset, rows, token ids) per window
        self._buf: torch.Tensor | None = None

    def __enter__(self) -> ReferenceLogits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._buf = None

    def append(self, i: int, ids: torch.Tensor, logits: torch.Tensor) -> None:
        """Store window `i` (token ids `ids`, logits [rows, vocab])."""
        if i != len(self._index):
            raise RuntimeError(f"reference window {i} stored out of order (expected {len(self._index)})")
        if self.vocab is None:
            self.vocab, self.dtype = int(logits.shape[-1]), logits.dtype
            self._check_space()
        t = logits.detach().to("cpu", self.dtype).contiguous()
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(t.view(torch.uint8).numpy().data)
        self._index.append((offset, int(t.shape[0]), ids.detach().to("cpu").clone()))

    def _check_space(self) -> None:
        need = self.total_rows * self.vocab * self.dtype.itemsize
        free = shutil.disk_usage(self.folder).free
        if need > free - 2**28:  # keep 256 MiB spare
            raise OutputError(f"KL and top-1 against a reference need {need / 2**30:.1f} GiB of temporary space for "
                              f"its logits, and {str(self.folder)!r} has {free / 2**30:.1f} GiB free; set TMPDIR to "
                              "a folder with room, or evaluate fewer tokens (--max-tokens)")

    def check(self, i: int, ids: torch.Tensor, vocab: int) -> None:
        """RuntimeError unless window `i` was stored for these token ids and this vocabulary size."""
        if i >= len(self._index) or not torch.equal(self._index[i][2], ids.to("cpu")) or vocab != self.vocab:
            raise RuntimeError(f"the stored reference logits of window {i} are for other tokens or another "
                               "vocabulary; this is a bug in llmq")

    def rows(self, i: int, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of window `i`. A view of a reused buffer: valid until the next call."""
        offset, n, _ = self._index[i]
        stop = min(stop, n)
        count = stop - start
        if self._buf is None or self._buf.shape[0] < count:
            self._buf = torch.empty(count, self.vocab, dtype=self.dtype)
        out = self._buf[:count]
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        self._file.seek(offset + start * self.vocab * self.dtype.itemsize)
        got = 0
        while got < len(view):
            k = self._file.readinto(view[got:])
            if not k:
                raise RuntimeError(f"the stored reference logits of window {i} are truncated")
            got += k
        return out


def _scored_rows(ids: torch.Tensor, cfg: Evaluation, bos: bool) -> int:
    from .data import eval_windows

    return sum(w.numel() + bos - 1 for w in eval_windows(ids.reshape(-1), cfg.seq_len))


def evaluate_pair(model: str, reference: str, cfg: Evaluation, *, tokenizer: Any = None,
                  model_kw: dict[str, Any] | None = None, reference_kw: dict[str, Any] | None = None,
                  reference_name: str | None = None, progress: bool = True) -> tuple[EvalResult, EvalResult]:
    """Evaluate `reference`, then `model` against it (KL, top-1), each loaded by llmq.load.load with its
    keyword arguments and alone in memory while measured. Returns (model result, reference result)."""
    from .data import bos_id as find_bos
    from .load import check_seq_len, load, load_config, load_tokenizer
    from .memory import release

    model_kw, reference_kw = dict(model_kw or {}), dict(reference_kw or {})
    m_cfg = load_config(model, bool(model_kw.get("trust_remote_code")))
    r_cfg = load_config(reference, bool(reference_kw.get("trust_remote_code")))
    if tokenizer is None:
        tokenizer = load_tokenizer(model, bool(model_kw.get("trust_remote_code")))
    bos = find_bos(tokenizer, cfg.bos) is not None
    for c in (m_cfg, r_cfg):  # before any weights load
        check_seq_len(SimpleNamespace(config=c), cfg.seq_len, "evaluation.seq_len (--seq-len)", bos)
    _check_vocab(*(getattr(c.get_text_config(), "vocab_size", None) for c in (m_cfg, r_cfg)))
    if getattr(m_cfg, "quantization_config", None):
        import bitsandbytes  # noqa: F401  (imported before either peak: library code is in neither model's)
    ids, bos_id = eval_ids(tokenizer, cfg)
    ref, _ = load(reference, **reference_kw)
    with ReferenceLogits(_scored_rows(ids, cfg, bos_id is not None)) as store:
        log.info("evaluating the reference %s alone (its logits go to a temporary file)", reference)
        r_ref = evaluate_ids(ref, ids, cfg.seq_len, bos_id=bos_id, record=store, progress=progress,
                             max_tokens=cfg.max_tokens, data=cfg.data)
        del ref
        release()
        m, _ = load(model, **model_kw)
        _check_vocab(_vocab_size(m), store.vocab)
        log.info("evaluating %s alone against the stored reference logits", model)
        r = evaluate_ids(m, ids, cfg.seq_len, bos_id=bos_id, reference=store, progress=progress,
                         max_tokens=cfg.max_tokens, data=cfg.data)
    r.reference = reference_name or reference
    del m
    release()
    return r, r_ref


def _check_vocab(model: int | None, reference: int | None) -> None:
    if isinstance(model, int) and isinstance(reference, int) and model != reference:
        raise ConfigError(f"the model has a vocabulary of {model} tokens and the reference {reference}: KL and "
                          "top-1 compare models that share a tokenizer; give another --reference")


def evaluate_quantized(recipe: Recipe, folder: str | Path, tokenizer: Any, *,
                       progress: bool = True) -> dict[str, dict[str, Any]]:
    """`quantize --eval`: the FP model (`recipe.model`), then the INT8 checkpoint in `folder` as stock
    from_pretrained loads it, each alone in memory. Returns the report's {"fp": ..., "int8": ...}."""
    kw = {"device": recipe.device, "trust_remote_code": recipe.trust_remote_code}
    r_q, r_fp = evaluate_pair(str(folder), recipe.model, recipe.evaluation, tokenizer=tokenizer,
                              model_kw=dict(kw, dtype="auto"), reference_kw=dict(kw, dtype=recipe.dtype),
                              reference_name="fp", progress=progress)
    return {"fp": r_fp.to_dict(), "int8": r_q.to_dict()}
