#!/usr/bin/env python
"""Quantize a model, evaluate FP vs INT8, write the model card, and push the folder to the Hub.

    python scripts/quantize_and_push.py llmq:smollm2 your-name/SmolLM2-135M-Instruct-w8a8 \
        --method smoothquant --alpha auto --out out/smollm2-w8a8

Thin on top of the public API (llmq.run -> llmq.push). The token comes from HF_TOKEN or `hf auth login` and
is never printed. If the push fails, the local folder stays; re-run `llmq push OUT REPO_ID` to retry
without quantizing again.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import llmq
from llmq.config import METHODS, Recipe, parse_set
from llmq.errors import LlmqError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("repo_id")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", choices=METHODS, default=None)
    ap.add_argument("--alpha", default=None)
    ap.add_argument("--recipe", default=None, help="YAML recipe; --set overrides its keys")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--private", action="store_true")
    ap.add_argument("--revision", default=None)
    ap.add_argument("--no-eval", action="store_true", help="skip the FP vs INT8 evaluation (the card says so)")
    a = ap.parse_args(argv)
    try:
        recipe = Recipe.from_yaml(a.recipe) if a.recipe else Recipe()
        overrides = {"model": a.model, "push.repo_id": a.repo_id, "push.private": a.private,
                     "push.revision": a.revision}
        if a.method:
            overrides["quantization.method"] = a.method
        if a.alpha:
            overrides["smoothing.alpha"] = a.alpha
        overrides.update(parse_set(a.sets))
        recipe = recipe.override(overrides)
        from llmq.hub import check_push_args

        check_push_args(a.repo_id, revision=a.revision)  # no token / bad id: fail before quantizing
        command = "python scripts/quantize_and_push.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
        report = llmq.run(recipe, a.out, overwrite=a.overwrite, evaluate=not a.no_eval, command=command)
        print(f"quantized {a.model} -> {a.out} ({report.method})")
        res = llmq.push(a.out, a.repo_id, private=a.private, revision=a.revision)
        print(f"pushed {len(res.files)} files to {res.repo_id}@{res.revision}: {res.commit_url}")
    except LlmqError as e:
        print(f"llmq: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
