"""Text sources -> token windows, shared by calibration and evaluation.

Sources (`load_text`): ``llmq:wiki`` (the offline Wikipedia articles, split by articles into disjoint
evaluation and calibration parts), ``llmq:kjv`` (the King James Bible: Old Testament for evaluation, New
Testament for calibration) or ``llmq:news`` (300 ABC news stories, split in halves), all offline, see
llmq/assets.py; a local UTF-8 ``.txt``, ``.jsonl`` (a ``text`` field
per line) or ``.json`` file (the whole file, whatever the purpose); or a named Hub dataset
(``wikitext2``, ``c4``, ``pile-val``) whose documents are joined by a blank line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from .config import OFFLINE_TEXT, offline
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

PURPOSES = ("calibration", "evaluation")
FILE_SUFFIXES = (".txt", ".jsonl", ".json")
_C4 = "allenai/c4"
# name -> purpose -> (load_dataset args, kwargs)
DATASETS: dict[str, dict[str, tuple[tuple[str, ...], dict[str, Any]]]] = {
    "wikitext2": {
        "evaluation": (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}),
        "calibration": (("wikitext", "wikitext-2-raw-v1"), {"split": "train"}),
    },
    "c4": {
        "evaluation": ((_C4,), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                                "split": "validation"}),
        "calibration": ((_C4,), {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"},
                                 "split": "train"}),
    },
    "pile-val": {
        "evaluation": (("mit-han-lab/pile-val-backup",), {"split": "validation"}),
        "calibration": (("mit-han-lab/pile-val-backup",), {"split": "validation"}),
    },
}
ACCEPTED = (f"{OFFLINE_TEXT!r}, 'llmq:kjv' or 'llmq:news', a local .txt/.jsonl/.json file, or a dataset name "
            f"({', '.join(DATASETS)}; needs the Hugging Face Hub)")
# First guess of characters per token when tokenizing only a prefix (English BPE: ~4.5).
_PREFIX_CHARS_PER_TOKEN = 6
_PREFIX_MARGIN = 64  # tokens tokenized beyond max_tokens and thrown away
_WORD_END = re.compile(r"\S(?=\s)")


def load_text(source: str, purpose: str = "evaluation") -> str:
    """The text of `source` for `purpose` ("calibration" or "evaluation"); see the module docstring."""
    if purpose not in PURPOSES:
        raise ConfigError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    if source.startswith("llmq:"):
        from . import assets

        text = assets.text(source, purpose)
    elif source in DATASETS:
        text = _load_dataset(source, purpose)
    else:
        path = Path(source).expanduser()
        if not path.is_file() or path.suffix.lower() not in FILE_SUFFIXES:
            what = "is not a file" if not path.exists() or path.is_dir() else "has an unsupported extension"
            raise DataError(f"text source {source!r} {what}; use {ACCEPTED}")
        text = _read_file(path)
    if not text.strip():
        raise DataError(f"text source {source!r} is empty; give it some text")
    return text


def _read_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{str(path)!r} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if "\x00" in text:
        raise DataError(f"{str(path)!r} looks binary (it holds NUL bytes); give a UTF-8 text file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return text
    if suffix == ".jsonl":
        texts = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                texts.append(_text_field(_json(line, f"{path}:{n}"), f"{path} line {n}"))
        return "\n\n".join(texts)
    data = _json(text, str(path))
    if isinstance(data, dict) and isinstance(data.get("text"), list):
        data = data["text"]
    if not isinstance(data, list):
        raise DataError(f"{str(path)!r} must hold a list of strings, a list of objects with 'text', "
                        f"or an object with a 'text' list; got {type(data).__name__}")
    return "\n\n".join(x if isinstance(x, str) else _text_field(x, f"{path} item {i}")
                       for i, x in enumerate(data))


def _json(s: str, where: str) -> Any:
    try:
        return json.loads(s)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg}); fix or remove that line") from None


def _text_field(obj: Any, where: str) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f"{where}: expected an object with a string 'text' field, got {str(obj)[:60]!r}")
    return obj["text"]


def _load_dataset(name: str, purpose: str) -> str:
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"dataset {name!r} needs the datasets package: pip install datasets") from None
    args, kwargs = DATASETS[name][purpose]
    log.info("loading dataset %s (%s) for %s", name, kwargs.get("split"), purpose)
    try:
        ds = load_dataset(*args, **kwargs)
        return "\n\n".join(ds["text"])
    except Exception as e:  # datasets raises many types (connection, offline, missing files); re-raise as one
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        where = "HF_HUB_OFFLINE is set" if offline() else "no network or the Hub refused"
        raise DataError(f"dataset {name!r} needs the Hugging Face Hub ({where}: {first}); use a local "
                        f".txt/.jsonl file or {OFFLINE_TEXT!r} instead") from None


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: the whole text is longer than model_max_length on purpose; windows are cut later.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.LongTensor:
    """1-D int64 token ids of `text` without special tokens; the first `max_tokens` if given.

    With `max_tokens`, only a prefix of the text is tokenized: it ends at the end of a word (just before
    whitespace), where pre-tokenizers always split, and it must yield `_PREFIX_MARGIN` tokens more than
    needed, so the ids equal the first `max_tokens` ids of the whole text (tests/test_data.py checks it).
    """
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    ids = None
    if max_tokens is not None:
        n_chars = (max_tokens + _PREFIX_MARGIN) * _PREFIX_CHARS_PER_TOKEN
        while n_chars < len(text):
            m = _WORD_END.search(text, n_chars)
            if m is None:
                break
            prefix_ids = _encode(tokenizer, text[: m.end()])
            if len(prefix_ids) >= max_tokens + _PREFIX_MARGIN:
                ids = prefix_ids[:max_tokens]
                break
            n_chars *= 2
    if ids is None:
        ids = _encode(tokenizer, text)[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of `seq_len` ids; a last partial window is kept if >= 2 ids."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise DataError(f"evaluation needs at least 2 tokens of 1-D ids, got shape {tuple(ids.shape)}; "
                        "use a longer text")
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    return [w for w in ids.split(seq_len) if w.numel() >= 2]


def calibration_windows(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.LongTensor:
    """[samples, seq_len]: `samples` of the floor(len/seq_len) disjoint slots, picked by `seed`, in order."""
    if samples < 1 or seq_len < 1:
        raise ConfigError(f"samples and seq_len must be >= 1, got {samples} and {seq_len}")
    n_slots = ids.numel() // seq_len
    if n_slots < samples:
        raise DataError(f"calibration text has {ids.numel()} tokens; {samples} samples x {seq_len} tokens "
                        f"needs {samples * seq_len}; use fewer --calib-samples, a shorter --calib-seq-len "
                        "or a longer source")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_slots, generator=generator)[:samples].sort().values
    return ids.reshape(-1)[: n_slots * seq_len].view(n_slots, seq_len)[chosen].long()


def bos_id(tokenizer: Any, bos: bool | str, where: str = "evaluation.bos") -> int | None:
    """The token id to put first in each window, or None. `bos`: True, False, or "auto": the BOS id when the
    tokenizer puts one before plain text by default (Gemma's, Llama's), i.e. what the model runs on in
    practice; None when it does not (SmolLM2's, GPT-2's). Windows are cut from text tokenized without special
    tokens, so without this a model trained to always see BOS would be calibrated and scored without it."""
    if bos is False:
        return None
    found = getattr(tokenizer, "bos_token_id", None)
    if bos == "auto":
        if found is None:
            return None
        with_special = tokenizer("a", verbose=False)["input_ids"]
        return found if with_special and with_special[0] == found else None
    if found is None:
        raise ConfigError(f"{where} is true but the tokenizer has no bos_token_id; set it to false or auto")
    return found


def calibration_set(tokenizer, cal, text: str | None = None) -> torch.LongTensor:
    """The calibration windows of a recipe's `Calibration` section: the one function both drivers and the
    benchmarks use, so every run of the same recipe sees the same windows. With a BOS (`bos_id`), each
    window is BOS + `seq_len - 1` text tokens."""
    text = load_text(cal.source, "calibration") if text is None else text
    bos = bos_id(tokenizer, cal.bos, "calibration.bos")
    n = cal.seq_len - (bos is not None)
    # 8x the needed tokens leaves room for seeded sampling without tokenizing whole dataset shards
    ids = tokenize(tokenizer, text, max_tokens=8 * cal.samples * cal.seq_len)
    windows = calibration_windows(ids, cal.samples, n, cal.seed)
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)
