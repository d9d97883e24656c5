"""Sequential (layer-by-layer) quantization, for models larger than memory.

The model is built on the meta device (accelerate `init_empty_weights`); only the non-layer weights
(embeddings, final norm, head) are read from the checkpoint's safetensors shards. The inputs of every
decoder layer (hidden states of layer 0; args/kwargs such as position embeddings and masks of every layer)
are caught per calibration window by recorders that stand in for the layers (the GPTQ / llm-compressor
"catcher"). Then, for each layer in turn: load its weights, run the calibration hidden states through it
with llmq.calibrate's hooks (running abs-max, auto-alpha rows), keep its float outputs as the next layer's
inputs (every layer sees float inputs, as in the in-memory path), smooth, convert its linears to Int8,
stage its state dict on disk and free it. Peak memory ~ one float layer + the calibration hidden states
(the non-layer weights are freed after the catch). The staged tensors, and the unchanged non-layer tensors
of the input (copied file to file), are written in the layout `save_pretrained` writes (file names, 5 GB
shards, index), so the output folder is the in-memory path's (llmq/pipeline.py), tensor for tensor.

One module, longer than the house ~300 lines: the checkpoint I/O below (reading shards, writing shards)
exists only for this mode; it could move to its own module if another user appears.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import Recipe
from .errors import ConfigError, ModelLoadError, NumericalError
from .storage import cast_unquantized_, storage_dtype, stored_dtype

log = logging.getLogger(__name__)
MAX_SHARD_BYTES = 5 * 10**9  # save.save_checkpoint's max_shard_size="5GB"
_CHUNK = 8 * 2**20  # bytes per read when copying or checking tensors
_ST_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
             "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class _Caught(Exception):
    """Raised by the last recorder: the layer inputs of this window are recorded, stop the forward."""


class _Recorder(nn.Module):
    """Stands in for decoder layer `idx`: records its inputs, passes the hidden states through."""

    def __init__(self, idx: int, inner: nn.Module, sink: list, last: bool) -> None:
        super().__init__()
        self._inner, self.idx, self.sink, self.last = [inner], idx, sink, last

    def __getattr__(self, name: str) -> Any:  # attributes the model's loop reads (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_inner":
                raise
            return getattr(self._inner[0], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.sink[self.idx] = (hidden if self.idx == 0 else None, args[1:], kwargs)
        if self.last:
            raise _Caught
        return hidden  # only ever fed to the next recorder, which ignores it


class _Feed(nn.Module):
    """Holds one decoder layer at its full name, so llmq.calibrate and check_fp16_range can drive it:
    calling it with a [1, seq_len] tensor filled with window index w runs the layer on window w."""

    def __init__(self, path: str, layer: nn.Module, inputs: list, extras: list, device: torch.device) -> None:
        super().__init__()
        node: nn.Module = self
        *parents, leaf = path.split(".")
        for p in parents:
            node.add_module(p, nn.Module())
            node = getattr(node, p)
        node.add_module(leaf, layer)
        self.layer, self.inputs, self.extras, self.device = [layer], inputs, extras, device
        self.store = True

    def forward(self, ids: torch.Tensor, use_cache: bool = False) -> None:
        w = int(ids[0, 0])
        h = self.inputs[w]
        args, kwargs = self.extras[w]
        out = self.layer[0](h.to(self.device), *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if self.store:
            self.inputs[w] = out.to(h.device)
            del h, out
            _trim()  # between windows, or the freed activations pile up in glibc's arenas


# --- checkpoint reading -----------------------------------------------------------------------------

def _weight_files(model: str) -> dict[str, Path]:
    """checkpoint key -> safetensors file, from model.safetensors(.index.json); only safetensors inputs."""
    from safetensors import safe_open

    from .load import _source

    src = _source(model)
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


def _key_map(model: nn.Module, ckpt: dict[str, Path]) -> dict[str, tuple[str, Path]]:
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


def _load_(model: nn.Module, keys: list[str], kmap: dict[str, tuple[str, Path]]) -> None:
    """Materialise `keys` on CPU from the shards, cast to the skeleton's dtype (as from_pretrained does)."""
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k in keys:
        if k in kmap:
            by_file.setdefault(kmap[k][1], []).append(k)
    for path, ks in by_file.items():
        with safe_open(str(path), "pt", device="cpu") as f:
            for k in ks:
                set_module_tensor_to_device(model, k, "cpu", value=f.get_tensor(kmap[k][0]))


def _still_meta(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}{n}" for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def _layers_path(model: nn.Module) -> str:
    """The decoder layers' ModuleList: llmq/arch.py's entry, else the largest ModuleList of that length."""
    from .arch import ARCHS

    arch = ARCHS.get(model.config.model_type)
    if arch is not None:
        return arch.layers
    n = model.config.get_text_config().num_hidden_layers
    lists = [(sum(p.numel() for p in m.parameters()), name) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        raise ModelLoadError(f"cannot find the {n} decoder layers of this {model.config.model_type} model; "
                             "quantize it without --sequential")
    return max(lists)[1]


# --- output writing ------------------------------------------------------------------------------

def _stage(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` under the names save_pretrained gives them (load-time renamings reverted)."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import revert_weight_conversion

    tensors = revert_weight_conversion(model, {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    save_file(tensors, str(path), {"format": "pt"})


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n, json.loads(f.read(n))


def _entry(ckpt_key: str, path: Path) -> tuple[Path, int, int, dict]:
    """(file, start, nbytes, header entry) of a checkpoint tensor."""
    start, head = _header(path)
    a, b = head[ckpt_key]["data_offsets"]
    return path, start + a, b - a, head[ckpt_key]


def _finite_on_disk(path: Path, start: int, nbytes: int, dtype: str) -> bool:
    """inf/nan check of a float tensor's bytes, read in chunks (the page cache, not this process, holds them)."""
    torch_dtype = {v: k for k, v in _ST_DTYPE.items()}[dtype]
    step = _CHUNK - _CHUNK % _ITEMSIZE[dtype]
    with open(path, "rb") as f:
        f.seek(start)
        while nbytes:
            chunk = f.read(min(nbytes, step))
            if not torch.isfinite(torch.frombuffer(bytearray(chunk), dtype=torch_dtype)).all():
                return False
            nbytes -= len(chunk)
    return True


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
        start, head = _header(p)
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


# --- the run --------------------------------------------------------------------------------------

def _skeleton(recipe: Recipe, dtype: torch.dtype):
    """The model on the meta device (buffers such as rotary inv_freq are real, on CPU), eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from .load import _check_causal, load_config

    config = load_config(recipe.model, recipe.trust_remote_code)
    _check_causal(config, recipe.model)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=recipe.trust_remote_code)
    model.tie_weights()
    model.eval()
    model.config.use_cache = False  # as llmq.load.load
    return model


def _place_(model: nn.Module, skip: list[str], device: torch.device) -> None:
    """Move the tensors of every module outside `skip` (module names) to `device`."""
    from accelerate.utils import set_module_tensor_to_device

    for name, mod in model.named_modules():
        if not any(name == s or name.startswith(s + ".") for s in skip):
            for t in [*mod._parameters, *mod._buffers]:
                if getattr(mod, t) is not None:
                    set_module_tensor_to_device(mod, t, device)


def _catch(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor, device: torch.device,
           store: torch.device) -> tuple[list[torch.Tensor], list[list]]:
    """Per window: layer 0's hidden states (kept on `store`), and every layer's other args/kwargs, as
    extras[layer][window]. The model runs each window as llmq.calibrate runs it."""
    n = len(layers)
    hidden: list[torch.Tensor] = []
    extras: list[list] = [[] for _ in range(n)]
    originals = list(layers)
    sink: list = [None] * n
    for i in range(n):
        layers[i] = _Recorder(i, originals[i], sink, last=i == n - 1)
    try:
        with torch.inference_mode():
            for w in range(windows.shape[0]):
                try:
                    model(windows[w:w + 1].to(device), use_cache=False)
                except _Caught:
                    pass
                hidden.append(sink[0][0].to(store))
                for i in range(n):
                    extras[i].append(sink[i][1:])
    finally:
        for i in range(n):
            layers[i] = originals[i]
    return hidden, extras


def _smooth_layer_(model: nn.Module, targets: list, stats, recipe: Recipe) -> dict[str, float]:
    """pipeline.quantize_model_'s smoothing, restricted to one layer's targets."""
    from .smooth import act_max, apply_scales_, smoothing_scales, weight_max

    sm = recipe.smoothing
    if not targets:
        return {}
    if sm.alpha == "auto":
        from .alpha import search_alpha_

        return search_alpha_(model, targets, stats, sm.grid, progress=False)[0]
    if sm.alpha != 0:
        with torch.no_grad():
            for t in targets:
                apply_scales_(model, t, smoothing_scales(act_max(t, stats.act_max), weight_max(model, t), sm.alpha))
    return dict.fromkeys((t.key for t in targets), float(sm.alpha))


def _check_range(feed: _Feed, first: torch.Tensor, seq_len: int) -> None:
    """check_fp16_range on the int8 layer, fed window 0's (float) input."""
    from .quantize import check_fp16_range

    out0, feed.inputs[0], feed.store = feed.inputs[0], first, False
    try:
        check_fp16_range(feed, torch.zeros(1, seq_len, dtype=torch.long))
    finally:
        feed.inputs[0], feed.store = out0, True


def _untie(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied copies (lm_head.weight of tied embeddings), as save_pretrained does."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target in sd and source in sd:
            del sd[target]
    return sd


def _save_config(model: nn.Module, recipe: Recipe, dtype: torch.dtype, src: str, folder: Path) -> None:
    """config.json and generation_config.json as save_pretrained writes them for the in-memory model."""
    from transformers import GenerationConfig

    from .quantize import bnb_quantization_config

    cfg = model.config
    cfg.quantization_config = bnb_quantization_config(recipe.quantization)
    cfg.dtype = str(dtype).split(".")[1]
    cfg.architectures = [type(model).__name__]
    cfg.save_pretrained(folder)
    if model.can_generate():
        try:
            gen = GenerationConfig.from_pretrained(src)
        except OSError:  # as from_pretrained: no generation_config.json -> from config.json
            gen = GenerationConfig.from_pretrained(src, config_file_name="config.json", _from_model_config=True)
        gen.save_pretrained(folder)


def _offload_hidden(recipe: Recipe, device: torch.device, max_memory: dict | None) -> bool:
    """Keep the calibration hidden states on CPU when the GPU budget cannot also hold them."""
    if not max_memory:
        return False
    from .plan import estimate, format_plan

    cal = recipe.calibration
    plan = estimate(recipe.model, method=recipe.quantization.method, dtype=recipe.dtype,
                    calib_samples=cal.samples, calib_seq_len=cal.seq_len, max_memory=max_memory,
                    alpha=recipe.smoothing.alpha, auto_tokens=recipe.smoothing.auto_tokens,
                    skip=recipe.quantization.skip, trust_remote_code=recipe.trust_remote_code)
    log.info("memory plan:\n%s", format_plan(plan))
    if not plan.fits_sequential:
        log.warning("the estimated sequential peak (%.2f GiB) exceeds the budget (%.2f GiB); trying anyway",
                    plan.sequential_peak_bytes / 2**30, (plan.budget_bytes or 0) / 2**30)
    return device.type != "cpu" and not plan.fits_sequential


@dataclass
class _Job:
    """One sequential run: the meta model, where its weights are, and the calibration state."""

    recipe: Recipe
    model: nn.Module
    path: str  # the decoder layers' ModuleList
    kmap: dict[str, tuple[str, Path]]
    qnames: list[str]  # linears to convert
    targets: list  # SmoothTargets of every layer
    stats: Any  # CalibrationStats from --act-scales, or None
    device: torch.device
    staging: Path
    windows: torch.Tensor | None = None  # all calibration windows, or only window 0 for the fp16 check
    collect: bool = False  # record activation maxima (auto alpha, or a fixed alpha without --act-scales)
    hidden: list | None = None
    extras: list | None = None
    storage: torch.dtype = torch.float32  # of the non-int8 tensors written (llmq/storage.py)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.path)

    def outside(self) -> list[str]:
        """State-dict keys outside the decoder layers (embeddings, final norm, head, buffers)."""
        return [k for k in self.model.state_dict(keep_vars=True) if not k.startswith(self.path + ".")]


def _check_outside(job: _Job) -> None:
    """Fail early, without loading them, if the non-layer float weights of the checkpoint hold inf/nan."""
    for k in job.outside():
        if k in job.kmap:
            f, start, n, meta = _entry(*job.kmap[k])
            if meta["dtype"] in _ST_DTYPE.values() and not _finite_on_disk(f, start, n, meta["dtype"]):
                raise NumericalError(f"the model's weights hold inf/nan in {k}; the checkpoint is damaged "
                                     "(re-download or re-export it)")
    _trim()  # the chunks read


def _load_outside_(job: _Job) -> None:
    _load_(job.model, job.outside(), job.kmap)  # memory-mapped: only the pages used are read
    job.model.tie_weights()
    missing = [k for k in _still_meta(job.model, "") if not k.startswith(job.path + ".")]
    if missing:
        raise ModelLoadError(f"{job.recipe.model!r} has no weights for {missing[:3]}: the checkpoint does not "
                             "match its config; quantize it without --sequential")


def _write_outside(job: _Job) -> dict[str, tuple[Path, int, int, dict]]:
    """Stage the non-layer tensors that change (dtype cast, int8 conversion); return the others as byte
    ranges of the input checkpoint, copied into the output untouched (never read into memory)."""
    from transformers.core_model_loading import revert_weight_conversion

    from .quantize import check_finite_weights, replace_linears_

    model = job.model
    convert = [n for n in job.qnames if not n.startswith(job.path + ".")]
    load, passthrough = [], {}
    for k, t in _untie(model, model.state_dict(keep_vars=True)).items():
        entry = _entry(*job.kmap[k]) if k in job.kmap else None
        same = entry and entry[3]["dtype"] == _ST_DTYPE.get(stored_dtype(model, k, t, job.storage))
        if same and not any(k.startswith(n + ".") for n in convert):
            passthrough[next(iter(revert_weight_conversion(model, {k: t})))] = entry
        else:
            load.append(k)
    _load_(model, load, job.kmap)
    check_finite_weights(model)
    replace_linears_(model, convert, job.recipe.quantization)
    cast_unquantized_(model, job.storage)
    sd = {k: v for k, v in _untie(model, model.state_dict()).items() if not v.is_meta}
    if sd:
        _stage(model, sd, job.staging / "rest.safetensors")
    return passthrough


def _catch_inputs_(job: _Job, store: torch.device) -> None:
    """Load the non-layer weights, catch every layer's inputs, and free those weights again: the layer
    loop does not need them (they are loaded once more at the end, to be written)."""
    from accelerate.utils import set_module_tensor_to_device

    _load_outside_(job)
    if job.device.type != "cpu":  # the head is never run here: it stays on CPU
        head = [n for n, m in job.model.named_modules() if m is job.model.get_output_embeddings()]
        _place_(job.model, [job.path, *head], job.device)
    job.hidden, job.extras = _catch(job.model, job.layers, job.windows, job.device, store)
    params = dict(job.model.named_parameters(remove_duplicate=False))
    for k in job.outside():
        if k in params or k in job.kmap:
            set_module_tensor_to_device(job.model, k, "meta")
    _trim()


def _quantize_layer_(job: _Job, i: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Load layer i, calibrate it on the hidden states (which become its outputs), smooth, convert, stage,
    free. Returns its activation maxima and alphas."""
    from .calibrate import CalibrationStats, calibrate
    from .quantize import check_finite_weights, replace_linears_

    sm, cal, layers, prefix = job.recipe.smoothing, job.recipe.calibration, job.layers, f"{job.path}.{i}."
    _load_(job.model, [k for k in job.model.state_dict(keep_vars=True) if k.startswith(prefix)], job.kmap)
    missing = _still_meta(layers[i], prefix)
    if missing:
        raise ModelLoadError(f"{job.recipe.model!r} has no weights for {missing[:3]}; quantize it without "
                             "--sequential")
    layers[i].to(job.device)
    check_finite_weights(layers[i])
    mine = [t for t in job.targets if t.prev_name.startswith(prefix)]
    stats, act = job.stats, {}
    feed = None
    if job.windows is not None:
        auto = sm.alpha == "auto"
        feed = _Feed(prefix[:-1], layers[i], job.hidden, job.extras[i], job.device)
        first = job.hidden[0]
        ids = torch.arange(job.windows.shape[0])[:, None].expand(job.windows.shape).contiguous()
        if job.collect:
            fresh = calibrate(feed, ids, sorted({n for t in mine for n in t.linear_names}),
                              sample_names=tuple(t.linear_names[0] for t in mine) if auto else (),
                              sample_tokens=sm.auto_tokens if auto else 0, seed=cal.seed,
                              progress=False)  # the feed leaves this layer's outputs in job.hidden
            act = fresh.act_max
            stats = fresh if stats is None else CalibrationStats(stats.act_max, fresh.samples)
        else:  # window 0 only, for the fp16 range check
            with torch.inference_mode():
                feed(ids[:1])
    alphas = _smooth_layer_(job.model, mine, stats, job.recipe)
    _trim()
    replace_linears_(job.model, [n for n in job.qnames if n.startswith(prefix)], job.recipe.quantization)
    _trim()
    if feed is not None:
        _check_range(feed, first, job.windows.shape[1])
    cast_unquantized_(job.model, job.storage, only=prefix)
    _stage(job.model, layers[i].state_dict(prefix=prefix), job.staging / f"layer-{i:05d}.safetensors")
    layers[i] = nn.Module()  # free it
    _trim()
    return act, alphas


def _trim() -> None:
    """Hand freed heap memory back to the OS. glibc keeps the activations freed in a layer (its mmap threshold
    grows with them), so without this the resident size creeps up layer after layer."""
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            log.debug("malloc_trim is not available here")


def run_sequential(recipe: Recipe, out: str | Path, *, overwrite: bool = False, command: str = "",
                   progress: bool = True, max_memory: dict | None = None) -> dict[str, Any]:
    """Quantize `recipe.model` layer by layer into the folder `out` (atomically). Writes what `pipeline.run`
    writes, with peak memory ~ one float layer + the calibration hidden states. Returns the report."""
    from transformers import AutoTokenizer
    from transformers.core_model_loading import dot_natural_key

    from . import __version__
    from .calibrate import CalibrationStats, load_act_scales, save_act_scales
    from .card import write_card
    from .data import load_text
    from .load import _source, check_seq_len, resolve_device, resolve_dtype
    from .memory import PeakMemory
    from .pipeline import _calibration_windows, versions
    from .provenance import provenance, public_recipe
    from .quantize import linear_names
    from .save import atomic_dir, check_output, write_json
    from .smooth import smooth_targets

    q, sm, cal = recipe.quantization, recipe.smoothing, recipe.calibration
    dest = check_output(out, overwrite)  # fail in the first second
    calibrating = q.method == "smoothquant" and (sm.alpha == "auto" or not cal.act_scales)
    cal_text = load_text(cal.source, "calibration") if calibrating else None  # fails before the model loads
    device = resolve_device(recipe.device)
    dtype = resolve_dtype(recipe.dtype, device)
    files = _weight_files(recipe.model)
    model = _skeleton(recipe, dtype)
    targets = smooth_targets(model, sm.groups) if q.method == "smoothquant" else []
    stats = load_act_scales(cal.act_scales) if targets and cal.act_scales else None
    if stats is not None and not {n for t in targets for n in t.linear_names} <= set(stats.act_max):
        lacks = sorted({n for t in targets for n in t.linear_names} - set(stats.act_max))
        raise ConfigError(f"--act-scales {cal.act_scales!r} does not match this model (it lacks {lacks[:2]}...); "
                          "recalibrate without it")
    src = _source(recipe.model)["pretrained_model_name_or_path"]
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=recipe.trust_remote_code)
    # as pipeline.quantize_model_: maxima for auto or a fixed alpha > 0 without --act-scales; every
    # smoothquant run checks the fp16 range of the int8 model on calibration window 0
    collect = bool(targets) and (sm.alpha == "auto" or (sm.alpha != 0.0 and stats is None))
    windows = None
    if targets:
        if calibrating:
            check_seq_len(model, cal.seq_len, "calibration.seq_len (--calib-seq-len)")
        windows = _calibration_windows(tok, recipe, cal_text)
        windows = windows if collect else windows[:1]
    store = torch.device("cpu") if _offload_hidden(recipe, device, max_memory) else device
    n_params = model.num_parameters()
    report: dict[str, Any] = {"llmq_version": __version__, **provenance(recipe, command), "versions": versions(),
                              "method": q.method, "threshold": q.effective_threshold, "skip": list(q.skip),
                              "alpha": None, "alphas": None, "calibration": None}
    with atomic_dir(dest, overwrite) as tmp:
        tok.save_pretrained(tmp)
        del tok, cal_text  # not needed any more: keep the peak down
        _trim()
        job = _Job(recipe, model, _layers_path(model), _key_map(model, files), linear_names(model, q.skip),
                   targets, stats, device, tmp / ".staging", windows, collect,
                   storage=storage_dtype(q.storage_dtype, dtype))
        missing = [n for n, _ in model.named_parameters() if n not in job.kmap]  # tied copies listed once
        if missing:
            raise ModelLoadError(f"{recipe.model!r} has no weights for {missing[:3]}: the checkpoint does not "
                                 "match its config; quantize it without --sequential")
        job.staging.mkdir()
        _check_outside(job)
        t0 = time.perf_counter()
        with PeakMemory(device) as pm:
            if windows is not None:
                _catch_inputs_(job, store)
            act: dict[str, torch.Tensor] = {}
            alphas: dict[str, float] = {}
            for i in tqdm(range(len(job.layers)), desc="sequential", unit="layer", disable=not progress):
                a, b = _quantize_layer_(job, i)
                act.update(a)
                alphas.update(b)
            job.hidden = job.extras = None
            passthrough = _write_outside(job)
        report["quantize"] = {"seconds": round(time.perf_counter() - t0, 3), "peak_memory_bytes": pm.peak_bytes,
                              "baseline_memory_bytes": pm.baseline_bytes, "peak_memory_kind": pm.kind,
                              "device": str(device), "mode": "sequential"}
        if targets:
            if collect:
                stats = stats or CalibrationStats(act_max=act)
                stats.tokens = int(windows.numel())
            report.update(alpha=sm.alpha, alphas=alphas,
                          calibration={"source": cal.source, "samples": cal.samples, "seq_len": cal.seq_len,
                                       "seed": cal.seed, "tokens": stats.tokens if stats else 0,
                                       "act_scales": cal.act_scales})
        staged = sorted(job.staging.glob("*.safetensors"))
        every = [k for p in staged for k in _header(p)[1] if k != "__metadata__"]
        every += list(passthrough)
        write_shards(staged, sorted(every, key=dot_natural_key), tmp, total_parameters=n_params,
                     max_shard_bytes=MAX_SHARD_BYTES, passthrough=passthrough)
        job.staging.rmdir()
        _save_config(model, recipe, job.storage, src, tmp)
        if stats is not None:
            save_act_scales(stats, tmp / "act_scales.safetensors")
        (tmp / "llmq_recipe.yaml").write_text(public_recipe(recipe).to_yaml(), encoding="utf-8")
        report["evaluation"] = None
        write_json(tmp / "llmq_report.json", report)
        write_card(tmp, recipe.push.repo_id)
    log.info("wrote %s (sequential, peak %.0f MB)", dest, pm.peak_bytes / 2**20)
    return report
