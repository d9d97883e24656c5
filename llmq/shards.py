"""Safetensors checkpoint I/O for the sequential driver: which file holds each tensor, loading a subset of
tensors into a meta-device skeleton, staging converted tensors, and writing the output shards in the layout
`save_pretrained` writes (file names, 5 GB shards, index), streaming bytes so memory stays small."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError, NumericalError

MAX_SHARD_BYTES = 5 * 10**9  # save.save_checkpoint's max_shard_size="5GB"
_CHUNK = 8 * 2**20  # bytes per read when copying or checking tensors
ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ITEMSIZE = {k: t.itemsize for k, t in _TORCH.items()}


def weight_files(model: str) -> dict[str, Path]:
    """checkpoint key -> safetensors file, from model.safetensors(.index.json); only safetensors inputs."""
    from safetensors import safe_open

    from .load import source

    src = source(model)
    if src["kind"] == "gguf":
        raise ConfigError(f"sequential mode reads safetensors checkpoints, got the GGUF file {model!r}; "
                          "quantize it without --sequential, or convert it to a safetensors folder first")
    root = src["pretrained_model_name_or_path"]

    def fetch(name: str) -> Path | None:
        if src["kind"] == "folder":
            p = Path(root) / name
            return p if p.is_file() else None
        from transformers.utils import cached_file

        got = cached_file(root, name, _raise_exceptions_for_missing_entries=False)
        return Path(got) if got else None

    index = fetch("model.safetensors.index.json")
    if index is not None:
        wmap = json.loads(index.read_text())["weight_map"]
        files = {f: fetch(f) for f in sorted(set(wmap.values()))}
        missing = [f for f, p in files.items() if p is None]
        if missing:
            raise ModelLoadError(f"{model!r}: the index names shards that are missing: {missing[:3]}")
        return {k: files[f] for k, f in wmap.items()}
    single = fetch("model.safetensors")
    if single is None:
        raise ConfigError(f"sequential mode needs safetensors weights, and {model!r} has none (only "
                          "pytorch_model.bin?); quantize it without --sequential, or re-save it with "
                          "save_pretrained(..., safe_serialization=True)")
    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def key_map(model: nn.Module, ckpt: dict[str, Path]) -> dict[str, tuple[str, Path]]:
    """model key -> (checkpoint key, file), renamed as from_pretrained renames them (transformers' conversion
    mapping, e.g. GPT-NeoX `embed_out` -> `lm_head`; base-model prefix added or stripped). The renamings
    used are kept on the model, so saving reverts them exactly as save_pretrained does."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta, prefix = model.state_dict(keep_vars=True), model.base_model_prefix
    out: dict[str, tuple[str, Path]] = {}
    for k in sorted(ckpt, key=dot_natural_key):
        name, converter = rename_source_key(k, renamings, converters, prefix, meta)
        if name not in meta and k in meta:
            name, converter = rename_source_key(k, [], [], prefix, meta)
        if converter is not None:
            raise ConfigError(f"checkpoint tensor {k!r} needs transformers' load-time conversion "
                              f"({converter!r}), which sequential mode does not do; quantize without --sequential")
        if name in meta:
            out.setdefault(name, (k, ckpt[k]))
    model._weight_conversions = [t for t in transforms if t.was_used()]
    return out


def load_tensors_(model: nn.Module, keys: list[str], kmap: dict[str, tuple[str, Path]]) -> None:
    """Materialise `keys` on CPU from the shards, cast to the skeleton's dtype (as from_pretrained does). Plain
    reads, not memory-mapped: a mapped file's pages count in the resident set, beside the copy, until it is
    closed (SmolLM2's catch phase: +113 MB, its float32 embedding twice)."""
    from accelerate.utils import set_module_tensor_to_device

    heads: dict[Path, tuple[int, dict]] = {}
    for k in keys:
        if k in kmap:
            path, start, nbytes, meta = entry(*kmap[k], heads)
            dtype = _TORCH[meta["dtype"]]
            if nbytes == 0:
                value = torch.empty(meta["shape"], dtype=dtype)
            else:
                buf = bytearray(nbytes)
                with open(path, "rb") as f:
                    f.seek(start)
                    f.readinto(buf)
                value = torch.frombuffer(buf, dtype=dtype).reshape(meta["shape"])
            set_module_tensor_to_device(model, k, "cpu", value=value)


def stage(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` under the names save_pretrained gives them (load-time renamings reverted)."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    tensors = revert_weight_conversion(model, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    save_file(tensors, str(path), {"format": "pt"})


def write_cast(dest: Path, items: list[tuple[str, str, str, Path, torch.dtype, torch.dtype]]) -> None:
    """A safetensors file of checkpoint tensors cast on the way, each read (plain reads, not memory-mapped),
    cast and written a piece of rows (~_CHUNK bytes) at a time, so memory holds one piece whatever the tensor's
    size. `items`: (name written, model key, checkpoint key, file, `via`: the dtype the model loads it in, `to`:
    the dtype it is stored in); the values are those of load_tensors_ then a cast to `to`. The checkpoint
    tensors must be float. NumericalError if one holds inf/nan in `via`."""
    heads: dict[Path, tuple[int, dict]] = {}
    src = {name: entry(ckey, path, heads) for name, _, ckey, path, _, _ in items}
    items = sorted(items, key=lambda e: (-e[5].itemsize, e[0]))  # as safetensors aligns
    head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, *_, to in items:
        shape = src[name][3]["shape"]
        n = to.itemsize * int(torch.Size(shape).numel())
        head[name] = {"dtype": ST_DTYPE[to], "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name, key, _, _, via, to in items:
            path, start, nbytes, meta = src[name]
            row = int(torch.Size(meta["shape"][1:]).numel()) * _ITEMSIZE[meta["dtype"]]  # bytes per row (scalar: 1)
            step = max(1, _CHUNK // max(row, 1)) * row
            for piece in _pieces(path, start, nbytes, meta["dtype"], step):
                piece = piece.to(via)
                if not torch.isfinite(piece).all():
                    raise NumericalError.damaged(key)
                out.write(memoryview(piece.to(to).view(torch.uint8).numpy()))


def header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def entry(ckpt_key: str, path: Path, heads: dict[Path, tuple[int, dict]] | None = None) -> tuple[Path, int, int, dict]:
    """(file, start, nbytes, header entry) of a checkpoint tensor. `heads`: the files' headers read so far (filled
    here), for callers that look up many tensors; without it the header is read on each call."""
    heads = {} if heads is None else heads
    if path not in heads:
        heads[path] = header(path)
    start, head = heads[path]
    a, b = head[ckpt_key]["data_offsets"]
    return path, start + a, b - a, head[ckpt_key]


def _pieces(path: Path, start: int, nbytes: int, dtype: str, step: int):
    """The `nbytes` bytes at `start` of `path`, `step` bytes at a time (plain reads: the page cache, not this
    process, holds the file), each piece a flat tensor of the safetensors `dtype`."""
    with open(path, "rb") as f:
        f.seek(start)
        while nbytes > 0:
            piece = f.read(min(nbytes, step))
            yield torch.frombuffer(bytearray(piece), dtype=_TORCH[dtype])  # (an empty read raises here)
            nbytes -= len(piece)


def abs_max_on_disk(path: Path, start: int, nbytes: int, dtype: str,
                    via: torch.dtype | None) -> tuple[bool, float]:
    """(all finite, largest |value| once cast to `via`; 0.0 for `via` None: not measured) of a float tensor's
    bytes, read in chunks."""
    top = 0.0
    for chunk in _pieces(path, start, nbytes, dtype, _CHUNK - _CHUNK % _ITEMSIZE[dtype]):
        if not torch.isfinite(chunk).all():
            return False, float("inf")
        if via is not None:
            top = max(top, chunk.to(via).abs().amax().item())
    return True, top


def _write_file(dest: Path, entries: list[tuple[str, Path, int, int, dict]]) -> None:
    """A safetensors file from byte ranges of staged files: (name, file, start, nbytes, header entry).
    Streams the bytes, so memory stays small whatever the shard size."""
    entries = sorted(entries, key=lambda e: (-_ITEMSIZE[e[4]["dtype"]], e[0]))  # as safetensors aligns
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, _, _, nbytes, meta in entries:
        header[name] = {"dtype": meta["dtype"], "shape": meta["shape"], "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for _, src, start, nbytes, _ in entries:
            with open(src, "rb") as f:
                f.seek(start)
                while nbytes:
                    chunk = f.read(min(nbytes, _CHUNK))
                    out.write(chunk)
                    nbytes -= len(chunk)


def write_shards(staged: list[Path], order: list[str], folder: Path, *, total_parameters: int,
                 max_shard_bytes: int = MAX_SHARD_BYTES, passthrough: dict | None = None) -> list[str]:
    """Copy the tensors of the staged safetensors files into `folder` as save_pretrained lays them out:
    `model.safetensors`, or `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` (tensors
    taken in `order`, a new shard when the next would pass `max_shard_bytes`). Deletes the staged files.
    `passthrough`: name -> (file, start, nbytes, header entry) byte ranges copied as they are (from the
    input checkpoint; never deleted). Returns the file names written."""
    where: dict[str, tuple[Path, int, int, dict]] = dict(passthrough or {})
    for p in staged:
        start, head = header(p)
        for k, meta in head.items():
            if k != "__metadata__":
                a, b = meta["data_offsets"]
                where[k] = (p, start + a, b - a, meta)
    keys = [k for k in order if k in where] + sorted(set(where) - set(order))
    shards: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for k in keys:  # huggingface_hub's split_state_dict_into_shards_factory, on byte counts
        n = where[k][2]
        if n > max_shard_bytes:
            shards.append([k])
            continue
        if size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur:
        shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    last_use = {where[k][0]: i for i, s in enumerate(shards) for k in s if where[k][0] in staged}
    for i, (name, shard) in enumerate(zip(names, shards, strict=True)):
        _write_file(folder / name, [(k, *where[k]) for k in shard])
        for p in [p for p, j in last_use.items() if j == i]:
            p.unlink()
    for p in staged:  # also those left with no tensors
        p.unlink(missing_ok=True)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": total_parameters, "total_size": sum(v[2] for v in where.values())},
                 "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def untie(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied copies (lm_head.weight of tied embeddings), as save_pretrained does."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in sd and source in sd:
            del sd[target]
    return sd


def save_config(model: nn.Module, quantization_config: dict, dtype: torch.dtype, src: str, folder: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them for the in-memory model."""
    from transformers import GenerationConfig

    cfg = model.config
    cfg.quantization_config = quantization_config
    cfg.dtype = str(dtype).split(".")[1]
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(folder)
    if model.can_generate():
        try:
            gen = GenerationConfig.from_pretrained(src)
        except OSError:  # as from_pretrained: no generation_config.json -> from config.json
            gen = GenerationConfig.from_pretrained(src, config_file_name="config.json", _from_model_config=True)
        gen.save_pretrained(folder)
