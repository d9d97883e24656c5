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

from .args import build_parser, recipe_from_args
from .errors import LlmqError

log = logging.getLogger("llmq")


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so `finally` blocks and atomic folders clean up."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _max_memory(spec: str | None) -> dict | None:
    if not spec:
        return None
    from .budget import parse_max_memory

    return parse_max_memory(spec)


def cmd_fetch(a) -> int:
    from .assets import ASSETS, fetch
    from .save import check_output_file

    if a.json_path:
        check_output_file(a.json_path)
    paths = {k: str(v) for k, v in fetch(tuple(a.names) or ASSETS).items()}
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
    if a.decode:
        from .speed import Decode

        dcfg = Decode(data=a.data, prompt_tokens=a.decode_prompt_tokens, new_tokens=a.decode_new_tokens,
                      repeats=a.decode_repeats)
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
    data = results["model"].to_dict()
    if a.reference:
        data["reference_result"] = results["reference"].to_dict()
    if a.decode:  # timed interleaved: here both models are in memory together (evaluate_pair freed them)
        from .speed import decode_report, format_decode

        if a.reference:
            model, tok = load(a.model, **model_kw)
        dref = load(a.reference, **kw)[0] if a.reference else None
        dec, note = decode_report(model, tok, dcfg, reference=dref, progress=a.progress)
        print(format_decode(dec))
        print(dec["model"].protocol)
        if note:
            print(f"note: {note}")
        data["decode"] = {k: v.to_dict() for k, v in dec.items()}
        data["decode_note"] = note
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(data, indent=2) + "\n")
    return 0


def cmd_quantize(a) -> int:
    from .save import check_output

    recipe = recipe_from_args(a)
    check_output(a.out, a.overwrite)  # bad flags and outputs fail in the first second, before torch loads
    if recipe.push.repo_id:
        from .hub import check_push_args

        check_push_args(recipe.push.repo_id)  # bad repo id / no token: fail before quantizing
    if a.format == "compressed-tensors":  # quantize into a hidden bitsandbytes folder, export it, push the export
        from .export import staging

        q = recipe.quantization
        with staging(a.out, a.overwrite, q.method, q.effective_threshold) as bnb:
            cmd_quantize(argparse.Namespace(**{**vars(a), "format": "bitsandbytes", "out": str(bnb), "push": None}))
            return cmd_export(argparse.Namespace(folder=str(bnb), format=a.format, out=a.out,
                                                 overwrite=a.overwrite, push=a.push, private=a.private,
                                                 progress=a.progress))
    from .plan import choose_mode
    from .run import run

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
    print(f"wrote {a.out} ({report.method}, threshold {report.threshold:g}, "
          f"quantized in {report.quantize.seconds:.1f} s)")
    if report.evaluation:
        from .evaluate import EvalResult, format_table

        ev = {k: EvalResult(**v) for k, v in report.evaluation.items()}
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


def cmd_export(a) -> int:
    from .export import export

    command = "llmq " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    res = export(a.folder, a.out, format=a.format, overwrite=a.overwrite, command=command)
    print(f"wrote {a.out} ({a.format} {res['compressed_tensors_format']}: {res['scheme']}; {res['linears']} int8 "
          f"linears, float: {', '.join(res['ignore']) or 'none'})")
    if getattr(a, "push", None):
        from .hub import push

        pushed = push(a.out, a.push, private=a.private, progress=a.progress)
        print(f"pushed {len(pushed.files)} files to {pushed.repo_id}: {pushed.commit_url}")
    return 0


def cmd_plan(a) -> int:
    from .budget import detected_budget
    from .config import Calibration, Smoothing
    from .plan import estimate, format_plan

    cal = Calibration(samples=a.calib_samples or Calibration.samples, seq_len=a.calib_seq_len or Calibration.seq_len)
    plan = estimate(a.model, method=a.method, dtype=a.dtype, calib_samples=cal.samples, calib_seq_len=cal.seq_len,
                    max_memory=_max_memory(a.max_memory) or detected_budget(), max_kl=a.max_kl, gptq=a.gptq,
                    alpha=Smoothing(alpha=a.alpha).alpha)
    print(format_plan(plan))
    return 0


COMMANDS = {"fetch": cmd_fetch, "eval": cmd_eval, "quantize": cmd_quantize, "plan": cmd_plan, "push": cmd_push,
            "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="llmq: %(message)s")
    # progress bars: off with -q or TQDM_DISABLE=1 (an explicit tqdm(disable=False) would override the env)
    args.progress = not args.quiet and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true", "yes")
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on CPU that its optional 4-bit kernels are missing, and the `kernels` package it looks
    # them up with (installed with transformers >= 5.25) warns that it cannot check their publisher offline
    # (llmq never uses 4-bit); and on every int8 forward that non-float16 inputs are cast to float16: the
    # documented W8A8 path
    for noisy in ("bitsandbytes.backends.cpu.ops", "kernels", "bitsandbytes.autograd._functions"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
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
