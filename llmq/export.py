"""Export an llmq output folder (bitsandbytes int8) to compressed-tensors, the checkpoint format vLLM serves.

The same model, nothing requantized. bitsandbytes stores each int8 linear as `weight` (int8 [out, in]) and
`SCB` (float32 [out], the row abs-max), so w = weight * SCB / 127. compressed-tensors stores the same int8
values and `weight_scale` = SCB / 127 (float32 [out, 1]); every other tensor (embeddings, the norms that hold
the smoothing, biases, the skipped lm_head) is copied unchanged.

    llmq method                compressed-tensors scheme                         format          vLLM scheme
    smoothquant (threshold 0)  W8A8: int8 weights per channel, int8 activations  int-quantized   W8A8Int8
                               per token, dynamic, symmetric
    weight-only                W8A16: int8 weights per channel                   pack-quantized  WNA16
    llm-int8 (threshold > 0)   none: its outlier split depends on each input's values

vLLM reads int8 weight-only checkpoints only as pack-quantized (four int8 values per int32, offset by 128),
packed here with compressed-tensors' own `pack_to_int32`. The `quantization_config` is built from the package's
schemes (the `W8A8` preset) and written by its `ModelCompressor.update_config`, as llm-compressor does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ExportError

log = logging.getLogger(__name__)

FORMATS = ("compressed-tensors",)
REPORT, CARD, CONFIG, INDEX = "llmq_report.json", "README.md", "config.json", "model.safetensors.index.json"
# Not copied: weights, config, report and card are rewritten; act_scales.safetensors would be read by vLLM
# as a weight file (it loads every *.safetensors of a folder without an index). It stays in the source.
_REWRITTEN = {CONFIG, CARD, REPORT, INDEX, "act_scales.safetensors"}
_PIP = "pip install compressed-tensors  (or: pip install 'llmq[export]')"
# llmq method -> (what it is, compressed-tensors storage format)
SCHEMES = {"smoothquant": ("W8A8 int8: per-channel weights, dynamic per-token activations", "int-quantized"),
           "weight-only": ("W8A16 int8: per-channel weights, activations unquantized", "pack-quantized")}


def check_available() -> str:
    """The installed compressed-tensors version; ExportError naming the pip line when it is missing."""
    try:
        import compressed_tensors
    except ImportError:
        raise ExportError(f"exporting to compressed-tensors needs the compressed-tensors package: {_PIP}") from None
    return compressed_tensors.__version__


def check_method(method: str, threshold: float | None) -> str:
    """The method a folder quantized with `method` and bitsandbytes `threshold` exports as; ExportError if none."""
    from .config import DEFAULT_THRESHOLD

    if method == "smoothquant" and threshold == 0:
        return method
    if method == "weight-only" and threshold is not None and 0 < threshold <= DEFAULT_THRESHOLD[method]:
        return method
    raise ExportError(f"a folder quantized with {method} (threshold {threshold:g}) cannot be exported to "
                      "compressed-tensors: the LLM.int8 outlier split (activation columns above the threshold in "
                      "16-bit; also --a16's) has no compressed-tensors or vLLM equivalent; quantize with --method "
                      "smoothquant (W8A8, without --a16) or --method weight-only (W8A16)")


def read_source(src: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any], str]:
    """(folder, config.json, llmq_report.json, method) of an llmq bitsandbytes output folder."""
    p = Path(src).expanduser().resolve()
    how = "give a folder written by `llmq quantize MODEL --out DIR`"
    if not p.is_dir():
        raise ExportError(f"{str(src)!r} is not a folder; {how}")
    missing = [n for n in (CONFIG, REPORT) if not (p / n).is_file()]
    if missing:
        raise ExportError(f"{str(src)!r} is not an llmq output folder (missing {', '.join(missing)}); {how}")
    try:
        config, report = (json.loads((p / n).read_text(encoding="utf-8")) for n in (CONFIG, REPORT))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{str(src)!r} holds an unreadable {CONFIG} or {REPORT} ({e.__class__.__name__}); "
                          "re-run `llmq quantize` to regenerate it") from None
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_8bit"):
        raise ExportError(f"{str(src)!r} is not a bitsandbytes int8 llmq folder (its quantization_config has "
                          f"quant_method {qc.get('quant_method')!r}); {how}")
    method = check_method(str(report.get("method")), float(qc.get("llm_int8_threshold", 0.0)))
    return p, config, report, method


def _shards(src: Path) -> list[str]:
    if (src / INDEX).is_file():
        return sorted(set(json.loads((src / INDEX).read_text())["weight_map"].values()))
    if not (src / "model.safetensors").is_file():
        raise ExportError(f"{str(src)!r} has neither model.safetensors nor {INDEX}; re-run `llmq quantize`")
    return ["model.safetensors"]


def _int8_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return [k[: -len(".SCB")] for k in f.keys() if k.endswith(".SCB")]


def _pack_int8(w):
    """compressed-tensors' pack-quantized layout for 8 bits (value + 128, four per int32)."""
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:  # where compressed-tensors < 0.20 kept it
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import pack_to_int32
    return pack_to_int32(w, 8)


def _convert(path: Path, method: str) -> tuple[dict[str, Any], list[str]]:
    """One shard's tensors in compressed-tensors layout, and the names of its int8 linears."""
    import torch
    from safetensors import safe_open

    out, linears = {}, []
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            if key.endswith(".weight_format"):  # bitsandbytes' layout tag: 0 = row-major int8
                if int(f.get_tensor(key)) != 0:
                    raise ExportError(f"{key} in {path.name} is not row-major int8 (weight_format "
                                      f"{int(f.get_tensor(key))}); re-quantize with a current bitsandbytes")
                continue
            if not key.endswith(".SCB"):
                if not (key.endswith(".weight") and f"{key[:-len('.weight')]}.SCB" in keys):
                    out[key] = f.get_tensor(key)
                continue
            name = key[: -len(".SCB")]
            w, scb = f.get_tensor(f"{name}.weight"), f.get_tensor(key)
            if w.dtype != torch.int8 or w.ndim != 2 or tuple(scb.shape) != (w.shape[0],):
                raise ExportError(f"{name} in {path.name} is not a bitsandbytes row-wise int8 weight "
                                  f"({w.dtype}, {tuple(w.shape)}); re-run `llmq quantize`")
            out[f"{name}.weight_scale"] = (scb.float() / 127.0).unsqueeze(1).contiguous()
            if method == "weight-only":
                out[f"{name}.weight_packed"] = _pack_int8(w)
                out[f"{name}.weight_shape"] = torch.tensor(w.shape, dtype=torch.int64)
            else:
                out[f"{name}.weight"] = w
            linears.append(name)
    return out, linears


def _ignored(src: Path, config: dict[str, Any], quantized: set[str]) -> list[str]:
    """The model's nn.Linear layers that stay in float (lm_head, --skip): the `ignore` list. The module tree
    is built from the config alone, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(src))
        del cfg.quantization_config
        with torch.device("meta"):
            modules = dict(AutoModelForCausalLM.from_config(cfg).named_modules())
    except Exception as e:  # custom code, unknown model_type: transformers raises many types
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"cannot build the {config.get('model_type')!r} module tree of {str(src)!r} from its "
                          f"config ({msg})") from None
    linear = {n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    odd = sorted(quantized - linear)
    if odd:
        kind = type(modules[odd[0]]).__name__ if odd[0] in modules else "module missing from the model"
        raise ExportError(f"{odd[0]} ({kind}) is not an nn.Linear; compressed-tensors and vLLM quantize nn.Linear "
                          f"layers only (a {config.get('model_type')} Conv1D stores its weight transposed); serve "
                          "the bitsandbytes folder with transformers instead")
    return sorted(linear - quantized)


def _quantization_config(method: str, ignore: list[str]):
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        preset_name_to_scheme,
    )

    if method == "smoothquant":
        scheme = preset_name_to_scheme("W8A8", targets=["Linear"])
    else:  # the W8A16 preset is group-128; llmq's rows have one scale per output channel
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False))
    return QuantizationConfig(config_groups={"group_0": scheme}, format=SCHEMES[method][1],
                              quantization_status="compressed", ignore=ignore)


def export(src: str | Path, out: str | Path, *, format: str = "compressed-tensors", overwrite: bool = False,
           command: str = "") -> dict[str, Any]:
    """Write the llmq folder `src` into the folder `out` (atomically) in `format`; returns the `export`
    section added to its llmq_report.json. Safetensors only; tokenizer and generation config copied;
    README.md says what the folder is and how to serve it."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    version = check_available()
    from .save import atomic_dir, check_output, write_json

    src_p, config, report, method = read_source(src)
    dest = check_output(out, overwrite)
    if dest == src_p or src_p in dest.parents:
        raise ExportError(f"--out {str(out)!r} is the source folder or inside it; choose another --out")
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    from .export_card import card

    shards = _shards(src_p)
    ignore = _ignored(src_p, config, {n for s in shards for n in _int8_names(src_p / s)})
    qconfig = _quantization_config(method, ignore)
    weight_map: dict[str, str] = {}
    n_int8 = 0
    with atomic_dir(dest, overwrite) as tmp:
        for shard in shards:  # one shard in memory at a time
            tensors, linears = _convert(src_p / shard, method)
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, shard))
            n_int8 += len(linears)
            del tensors
        if (src_p / INDEX).is_file():
            meta = json.loads((src_p / INDEX).read_text()).get("metadata", {})
            write_json(tmp / INDEX, {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))})
        for f in sorted(src_p.iterdir()):  # tokenizer, generation config, chat template, llmq_recipe.yaml
            if f.is_file() and not f.is_symlink() and not f.name.startswith(".") and f.name not in _REWRITTEN \
                    and f.suffix not in (".safetensors", ".bin", ".pt", ".pth", ".pkl"):
                shutil.copyfile(f, tmp / f.name)
        write_json(tmp / CONFIG, {k: v for k, v in config.items() if k != "quantization_config"})
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        section = {"format": format, "compressed_tensors_format": SCHEMES[method][1], "scheme": SCHEMES[method][0],
                   "source": str(src_p), "linears": n_int8, "ignore": ignore,
                   "compressed_tensors_version": version, "command": command}
        write_json(tmp / REPORT, {**report, "export": section})
        (tmp / CARD).write_text(card(src_p, report, section), encoding="utf-8")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # world-readable, like a Hub download
    log.info("exported %s (%s, %d int8 linears) to %s", src_p, section["scheme"], n_int8, dest)
    return section


@contextlib.contextmanager
def staging(out: str | Path, overwrite: bool, method: str, threshold: float) -> Iterator[Path]:
    """For `quantize --format compressed-tensors`: a hidden path beside `out` for the bitsandbytes folder,
    removed afterwards whatever happens. Checks the method, the package and `out` before any quantizing."""
    from .save import TMP_MARK, check_output

    check_method(method, threshold)
    check_available()
    dest = check_output(out, overwrite)
    tmp = dest.parent / f".{dest.name}{TMP_MARK}bnb-{os.getpid()}"
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
