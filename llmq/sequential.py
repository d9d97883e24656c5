"""The sequential (layer-by-layer) driver, for models larger than memory.

The model is built on the meta device; only the non-layer weights (embeddings, final norm, head) are read
from the checkpoint's safetensors shards (llmq/shards.py). The inputs of every decoder layer (hidden states
of layer 0; args/kwargs such as position embeddings and masks of every layer) are caught per calibration
window by recorders that stand in for the layers (the GPTQ / llm-compressor "catcher"). Then, for each layer
in turn: load its weights and run llmq/stage.py on it, fed the cached hidden states (its float outputs
become the next layer's inputs, as the in-memory driver's single float pass gives them), stage its state
dict on disk and free it. Peak memory ~ one float layer + the calibration hidden states. The output folder
is the in-memory driver's (llmq/run.py), tensor for tensor.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import shards
from .alpha import resolve_refine
from .arch import layers_path
from .calibrate import CalibrationStats, resolve_statistic, saved_stats
from .config import Recipe
from .errors import ConfigError, ModelLoadError, NumericalError
from .layers import catch_inputs, quantize_layers_
from .load import (
    check_causal,
    check_seq_len,
    load_config,
    load_tokenizer,
    place_,
    resolve_device,
    resolve_dtype,
    skeleton,
    source,
)
from .memory import PeakMemory, trim_heap
from .quantize import bnb_quantization_config, check_finite_weights, check_skip_matches, linear_names, replace_linears_
from .report import QuantizeInfo, Report
from .rotate import unguarded_rotate
from .run import calibration_split, finish_output, preflight, stamp_
from .save import atomic_dir
from .stage import block_report, check_scales, full_pass, needs_windows, smoothing_targets
from .storage import cast_unquantized_, measures_range, storage_dtype, storage_entry, stored_dtype, value_max

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """One sequential run: the meta model, where its weights are, and the calibration state."""

    recipe: Recipe
    model: nn.Module
    path: str  # the decoder layers' ModuleList
    kmap: dict[str, tuple[str, Path]]
    qnames: list[str]  # linears to convert
    targets: list  # SmoothTargets of every layer
    scales: CalibrationStats | None  # from --act-scales
    device: torch.device
    staging: Path
    windows: torch.Tensor | None = None  # all calibration windows, or only window 0 for the fp16 check
    hidden: list | None = None
    extras: list | None = None
    # of the non-int8 tensors written (llmq/storage.py); None until the layer loop measured the range auto
    # decides on (then every layer's float tensors wait in the run dtype, apart from its int8 state)
    storage: torch.dtype | None = torch.float32
    weight_max: float = 0.0  # largest |non-int8 weight| (llmq/storage.py value_max) seen, while storage is None

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.path)

    def outside(self) -> list[str]:
        """State-dict keys outside the decoder layers (embeddings, final norm, head, buffers)."""
        return [k for k in self.model.state_dict(keep_vars=True) if not k.startswith(self.path + ".")]

    def missing(self, module: nn.Module, prefix: str) -> list[str]:
        return [f"{prefix}{n}" for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def _check_outside(job: _Job) -> None:
    """Fail early, without loading them, if the non-layer float weights of the checkpoint hold inf/nan; while
    the storage dtype is undecided, their largest |value| in the run dtype counts toward auto's range."""
    sd, measure, heads = job.model.state_dict(keep_vars=True), job.storage is None, {}
    for k in job.outside():
        if k in job.kmap:
            f, start, n, meta = shards.entry(*job.kmap[k], heads)
            if meta["dtype"] in shards.ST_DTYPE.values() and sd[k].is_floating_point():
                finite, top = shards.abs_max_on_disk(f, start, n, meta["dtype"], sd[k].dtype if measure else None)
                if not finite:
                    raise NumericalError.damaged(k)
                job.weight_max = max(job.weight_max, top)
    if measure:
        job.weight_max = max(job.weight_max, value_max(job.model))  # the buffers built with the skeleton
    trim_heap()  # the chunks read


def _catch_inputs_(job: _Job, store: torch.device) -> None:
    """Load the non-layer weights but an untied head (never run here: the last recorder stops the forward),
    catch every layer's inputs, and free those weights again: the layer loop does not need them."""
    from accelerate.utils import set_module_tensor_to_device

    model, out = job.model, job.model.get_output_embeddings()
    head = [n for n, m in model.named_modules() if m is out]
    untied = out is not None and out.weight is not model.get_input_embeddings().weight
    keys = [k for k in job.outside() if not (untied and any(k.startswith(h + ".") for h in head))]
    shards.load_tensors_(model, keys, job.kmap)
    model.tie_weights()
    missing = [k for k in job.missing(model, "") if not k.startswith(job.path + ".") and k in keys]
    if missing:
        raise ModelLoadError(f"{job.recipe.model!r} has no weights for {missing[:3]}: the checkpoint does not "
                             "match its config; quantize it without --sequential")
    if job.device.type != "cpu":
        place_(model, [job.path, *head], job.device)
    _load_layer(job, 0)  # the catcher runs layer 0 once, to hand the model's loop what a layer returns
    job.hidden, job.extras = catch_inputs(job.model, job.layers, job.windows, job.device, store)
    params = dict(job.model.named_parameters(remove_duplicate=False))
    for k in job.outside():
        if k in params or k in job.kmap:
            set_module_tensor_to_device(job.model, k, "meta")
    trim_heap()


def _load_layer(job: _Job, i: int) -> None:
    prefix = f"{job.path}.{i}."
    if not any(p.is_meta for p in job.layers[i].parameters()):
        return  # layer 0, loaded for the catcher
    shards.load_tensors_(job.model, [k for k in job.model.state_dict(keep_vars=True) if k.startswith(prefix)],
                         job.kmap)
    missing = job.missing(job.layers[i], prefix)
    if missing:
        raise ModelLoadError(f"{job.recipe.model!r} has no weights for {missing[:3]}; quantize it without "
                             "--sequential")
    job.layers[i].to(job.device)


def _unload_layer(job: _Job, i: int) -> None:
    """Stage the converted layer's tensors on disk and free it. While the storage dtype is undecided, its
    float tensors (norms, biases, linears kept float; not SCB) are staged apart, in the run dtype."""
    from safetensors.torch import save_file

    prefix = f"{job.path}.{i}."
    if job.storage is not None:
        cast_unquantized_(job.model, job.storage, only=prefix)
    sd = job.layers[i].state_dict(prefix=prefix)
    if job.storage is None:
        job.weight_max = max(job.weight_max, value_max(job.model, only=prefix))
        floats = {k: t for k, t in sd.items() if t.is_floating_point() and not k.endswith("SCB")}
        save_file({k: t.detach().to("cpu").contiguous() for k, t in floats.items()},
                  str(job.staging / f"float-{i:05d}.safetensors"), {"format": "pt"})  # model names
        sd = {k: t for k, t in sd.items() if k not in floats}
    shards.stage(job.model, sd, job.staging / f"layer-{i:05d}.safetensors")
    job.layers[i] = nn.Module()
    trim_heap()


def _decide_storage(job: _Job, run: torch.dtype, act_max: float | None) -> dict:
    """After the layer loop: auto's storage dtype from the measured range (as llmq/storage.py's
    `to_storage_dtype_` decides it in memory), then the layers' float tensors staged apart are cast to it."""
    from safetensors.torch import load_file

    name = job.recipe.quantization.storage_dtype
    vmax = None if act_max is None else max(act_max, job.weight_max)
    job.storage = storage_dtype(name, run, vmax)
    for p in sorted(job.staging.glob("float-*.safetensors")):
        sd = load_file(str(p))
        shards.stage(job.model, {k: t.to(stored_dtype(job.model, k, t, job.storage)) for k, t in sd.items()}, p)
    return storage_entry(job.storage, name, run, vmax)


def _write_outside(job: _Job) -> dict[str, tuple[Path, int, int, dict]]:
    """Stage the non-layer tensors that change: float ones cast a piece at a time from the checkpoint to a
    staged file (shards.write_cast: never whole in memory), linears to convert loaded and converted; return
    the others as byte ranges of the input checkpoint, copied into the output untouched (never loaded)."""
    from transformers.core_model_loading import revert_weight_conversion

    model = job.model
    convert = [n for n in job.qnames if not n.startswith(job.path + ".")]
    load, cast, passthrough, heads = [], [], {}, {}
    for k, t in shards.untie(model, model.state_dict(keep_vars=True)).items():
        entry = shards.entry(*job.kmap[k], heads) if k in job.kmap else None
        to = stored_dtype(model, k, t, job.storage)
        name = next(iter(revert_weight_conversion(model, {k: t})))
        floats = entry is not None and t.is_floating_point() and entry[3]["dtype"] in shards.ST_DTYPE.values()
        if not floats or any(k.startswith(n + ".") for n in convert):
            load.append(k)
        elif entry[3]["dtype"] == shards.ST_DTYPE[to] and (t.dtype == to or t.dtype == torch.float32):
            passthrough[name] = entry  # input -> run dtype -> storage dtype is exact: the input's bytes
        else:
            cast.append((name, k, *job.kmap[k], t.dtype, to))
    if cast:
        shards.write_cast(job.staging / "cast.safetensors", cast)
    shards.load_tensors_(model, load, job.kmap)
    check_finite_weights(model)
    replace_linears_(model, convert, job.recipe.quantization)
    cast_unquantized_(model, job.storage)
    sd = {k: v for k, v in shards.untie(model, model.state_dict()).items() if not v.is_meta}
    if sd:
        shards.stage(model, sd, job.staging / "rest.safetensors")
    return passthrough


def _offload_hidden(recipe: Recipe, device: torch.device, max_memory: dict | None) -> bool:
    """Keep the calibration hidden states on CPU when the GPU budget cannot also hold them."""
    if not max_memory:
        return False
    from .plan import estimate, format_plan

    cal = recipe.calibration
    plan = estimate(recipe.model, method=recipe.quantization.method, dtype=recipe.dtype,
                    calib_samples=cal.samples, calib_seq_len=cal.seq_len, max_memory=max_memory,
                    alpha=recipe.smoothing.alpha, auto_tokens=recipe.smoothing.auto_tokens,
                    skip=recipe.quantization.skip, gptq=recipe.quantization.gptq,
                    trust_remote_code=recipe.trust_remote_code)
    log.info("memory plan:\n%s", format_plan(plan))
    if not plan.fits_sequential:
        log.warning("the estimated sequential peak (%.2f GiB) exceeds the budget (%.2f GiB); trying anyway",
                    plan.sequential_peak_bytes / 2**30, (plan.budget_bytes or 0) / 2**30)
    return device.type != "cpu" and not plan.fits_sequential


def run_sequential(recipe: Recipe, out: str | Path, *, overwrite: bool = False, command: str = "",
                   progress: bool = True, max_memory: dict | None = None) -> Report:
    """Quantize `recipe.model` layer by layer into the folder `out` (atomically). Writes what `run.run`
    writes, with peak memory ~ one float layer + the calibration hidden states. Returns the Report."""
    from transformers.core_model_loading import dot_natural_key

    inputs = preflight(recipe, out, overwrite)
    recipe, asked = resolve_refine(resolve_statistic(recipe, inputs.scales), False), recipe  # no guard here
    q, cal = recipe.quantization, recipe.calibration
    if unguarded_rotate(q.rotate, inputs.scales):
        raise ConfigError("--rotate needs the whole model in memory (it rotates the embedding, every layer and "
                          "lm_head together); sequential mode cannot run it: drop --rotate (or --act-scales "
                          "measured with it) or --sequential")
    device = resolve_device(recipe.device)
    dtype = resolve_dtype(recipe.dtype, device)
    files = shards.weight_files(recipe.model)
    config = load_config(recipe.model, recipe.trust_remote_code)
    check_causal(config, recipe.model)
    model = skeleton(config, dtype=dtype, trust_remote_code=recipe.trust_remote_code)
    model.config.use_cache = False  # as llmq.load.load
    names = linear_names(model, q.skip)  # before any text or weights: a model llmq cannot convert fails here
    targets = smoothing_targets(model, recipe)
    check_scales(inputs.scales, targets, cal.act_scales)
    src = source(recipe.model)["pretrained_model_name_or_path"]
    tok = load_tokenizer(recipe.model, recipe.trust_remote_code)
    windows = None
    if needs_windows(recipe):
        check_seq_len(model, cal.seq_len, "calibration.seq_len (--calib-seq-len)")
        windows, _ = calibration_split(tok, recipe, inputs.cal_text)  # the guard does not run here
        windows = windows if full_pass(recipe, inputs.scales is not None) else windows[:1]
    store = torch.device("cpu") if _offload_hidden(recipe, device, max_memory) else device
    n_params = model.num_parameters()
    with atomic_dir(inputs.dest, overwrite) as tmp:
        tok.save_pretrained(tmp)
        del tok, inputs.cal_text  # not needed any more: keep the peak down
        trim_heap()
        check_skip_matches([n for n, _ in model.named_modules()], q.skip)
        job = _Job(recipe, model, layers_path(model), shards.key_map(model, files), names,
                   targets, inputs.scales, device, tmp / ".staging", windows,
                   storage=None if measures_range(q.storage_dtype, dtype) else storage_dtype(q.storage_dtype, dtype))
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
            total = quantize_layers_(model, job.path, recipe, targets, job.qnames, hidden=job.hidden,
                                     extras=job.extras, seq_len=cal.seq_len, scales=inputs.scales, device=device,
                                     load=lambda i: _load_layer(job, i), unload=lambda i: _unload_layer(job, i),
                                     progress=progress)
            job.hidden = job.extras = None
            storage = (_decide_storage(job, dtype, total.act_range) if job.storage is None else
                       storage_entry(job.storage, q.storage_dtype, dtype, None))
            passthrough = _write_outside(job)
        report = stamp_(block_report(recipe, total), recipe, command)
        report.storage = storage
        report.quantize = QuantizeInfo(round(time.perf_counter() - t0, 3), pm.peak_bytes, pm.baseline_bytes,
                                       pm.kind, str(device), mode="sequential")
        staged = sorted(job.staging.glob("*.safetensors"))
        every = [k for p in staged for k in shards.header(p)[1] if k != "__metadata__"] + list(passthrough)
        shards.write_shards(staged, sorted(every, key=dot_natural_key), tmp, total_parameters=n_params,
                            max_shard_bytes=shards.MAX_SHARD_BYTES, passthrough=passthrough)
        job.staging.rmdir()
        shards.save_config(model, bnb_quantization_config(q, model), job.storage, src, tmp)
        finish_output(tmp, asked, report, saved_stats(inputs.scales, total, cal.statistic))
    log.info("wrote %s (sequential, peak %.0f MB)", inputs.dest, pm.peak_bytes / 2**20)
    return report
