"""README.md of an exported folder: what it is, how to serve it, and the source folder's card (its method,
calibration and evaluation sections), which describe the same int8 weights."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_SECRET = re.compile(r"\bhf_[A-Za-z0-9]{30,}|(?i:(?<=bearer )\S+)")
_NEEDS = {
    "int-quantized": ("W8A8", "int8 x int8 matmuls: CUTLASS kernels on NVIDIA GPUs of compute capability 7.5 to "
                      "9.x (Turing, Ampere, Ada, Hopper), oneDNN on x86 CPUs (vLLM's CPU build)"),
    "pack-quantized": ("W8A16", "int8 weights dequantized inside mixed-precision GEMM kernels (Marlin family): "
                       "NVIDIA GPUs of compute capability 8.0 or newer"),
}


def card(src: Path, report: dict[str, Any], export: dict[str, Any]) -> str:
    """README.md text for the exported folder."""
    import yaml

    from .card import is_hub_id

    fmt = export["compressed_tensors_format"]
    short, needs = _NEEDS[fmt]
    base = report.get("base_model")
    meta: dict[str, Any] = {}
    if is_hub_id(base):
        meta.update(base_model=base, base_model_relation="quantized")
    meta.update(library_name="transformers", pipeline_tag="text-generation")
    if report.get("license"):
        meta["license"] = str(report["license"])
    meta["tags"] = ["llmq", "int8", "8-bit", "compressed-tensors", "vllm", short.lower(), str(report.get("method"))]
    name = base if is_hub_id(base) else Path(str(base or src.name)).name
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---",
        f"# {name} · INT8 {short} (compressed-tensors)",
        f"`{base or 'a causal LM'}` quantized with [llmq](https://pypi.org/project/llmq/) "
        f"({report.get('method')}) and exported from its bitsandbytes folder to the compressed-tensors "
        f"`{fmt}` format ({export['scheme']}), which vLLM serves. The int8 weights and per-row scales are the "
        "bitsandbytes folder's, unchanged (weight_scale = SCB / 127): nothing was requantized. "
        f"{export['linears']} linears are int8; these stay in float: {', '.join(export['ignore']) or 'none'}.",
        "## Serve with vLLM",
        f"Needs {needs}.\n\n```bash\npip install vllm\nvllm serve path/or/hub-id-of-this-folder\n```",
        "## Load with transformers",
        "```python\n# pip install transformers compressed-tensors\nfrom transformers import AutoModelForCausalLM, "
        "AutoTokenizer\n\nmodel_id = \"path/or/hub-id-of-this-folder\"\ntokenizer = AutoTokenizer.from_pretrained("
        "model_id)\nmodel = AutoModelForCausalLM.from_pretrained(model_id)\n```\n\n"
        "transformers runs this on any device without int8 kernels: the weights are decompressed to the model's "
        "dtype on the first forward pass"
        + (" and each linear's input is quantized to int8 per token on the fly (a simulation of the int8 "
           "matmul)." if fmt == "int-quantized" else "."),
        "## Exported with",
        f"`{export.get('command') or 'llmq export'}` (compressed-tensors {export['compressed_tensors_version']}).",
        *_source_card(src),
    ]
    return _SECRET.sub("***", "\n\n".join(p.strip("\n") for p in parts) + "\n")


def _source_card(src: Path) -> list[str]:
    """The source folder's card without its front matter, title and (bitsandbytes) usage, headings demoted."""
    path = src / "README.md"
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    if text.startswith("---\n"):
        text = text.split("\n---\n", 1)[-1]
    sections = [s for s in re.split(r"(?m)^## ", text)[1:] if s.split("\n", 1)[0].strip() != "Usage"]
    if not sections:
        return []
    head = ("## The source bitsandbytes folder\n\nFrom its model card. Numbers there were measured on the "
            "bitsandbytes model; this folder holds the same int8 weights.")
    return [head, *("### " + re.sub(r"(?m)^### ", "#### ", s) for s in sections)]
