"""Model-card sections for the checks of a run: the per-channel refinement of `--alpha auto` (llmq/alpha.py,
kept only where a layer's output error fell), its end-to-end guard (llmq/guard.py: every candidate's held-out
KL, top-1 and NLL, and which one shipped) and `--max-kl` (the linears kept in float)."""

from __future__ import annotations

import statistics
from typing import Any

from .report import Report


def checks(rep: Report) -> list[str]:
    return [*_refined(rep), *_guard(rep), *_keep(rep)]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if _num(v) is not None else "not measured"


def _cell(v: Any) -> str:
    return "not recorded" if v is None else str(v).replace("|", "\\|")


def _mem(b: Any) -> str | None:
    b = _num(b)
    return None if b is None else (f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB")


def _refined(rep: Report) -> list[str]:
    r = rep.refined
    if not isinstance(r, dict) or not isinstance(r.get("ratios"), dict):
        return []
    groups = [str(g) for g in r.get("groups") or []]
    alphas = rep.alphas if isinstance(rep.alphas, dict) else {}
    eligible = sum(1 for k in alphas if str(k).rsplit(".", 1)[-1] in groups)
    ratios = [v for v in map(_num, r["ratios"].values()) if v is not None]
    took = (f"{len(ratios)} of {eligible} took them (their group's simulated error x{statistics.median(ratios):.2f}"
            " of the alpha alone, median)" if ratios else f"none of {eligible} took them")
    return [f"Per-channel scales (`smoothing.refine`: {', '.join(groups)}): on top of its alpha, each such group's "
            "scales were fitted channel by channel to its simulated int8 output on its calibration rows, and kept "
            f"only where the decoder layer's output error fell; {took}."]


def _guard(rep: Report) -> list[str]:
    g = rep.guard
    if rep.alpha != "auto":
        return []
    if not isinstance(g, dict) or not isinstance(g.get("candidates"), dict):
        return ["## Guard", "The end-to-end guard did not run (sequential mode, or `smoothing.guard_windows: 0`): "
                "auto was not compared with alpha 0 on held-out windows."]
    rows = "\n".join(f"| {k}{' (shipped)' if k == g.get('chosen') else ''} | {_cell(v.get('alpha'))} | "
                     f"{_fmt(v.get('kl_divergence'), '.4g')} | {_fmt(v.get('top1_agreement'), '.2%')} | "
                     f"{_fmt(v.get('nll'), '.4f')} |" for k, v in g["candidates"].items())
    chosen = str(g.get("chosen"))
    if not g.get("fell_back"):
        verdict = "Auto had the lowest held-out KL and was shipped."
    elif chosen.startswith("auto, "):  # the same search with one setting changed (llmq/guard.py rivals)
        verdict = f"The lowest held-out KL was {chosen}'s (auto's search, {chosen[6:]}), so it was shipped."
    else:
        verdict = f"Auto's held-out KL was above {chosen}'s, so {chosen} was shipped."
    return ["## Guard", f"Each candidate was built and compared with the float model on {g.get('held_out_windows')} "
            f"calibration windows held out from calibration and the alpha search ({g.get('held_out_tokens')} "
            f"scored tokens). {verdict}",
            "| candidate | alpha | KL to FP | top-1 | NLL |\n|---|---|---|---|---|\n" + rows]


def _keep(rep: Report) -> list[str]:
    k = rep.keep
    if not isinstance(k, dict):
        return []
    kept = k.get("kept") or []
    names = ", ".join(f"`{n}`" for n in kept[:20]) + (f" and {len(kept) - 20} more" if len(kept) > 20 else "")
    return ["## Kept in 16-bit (`--max-kl`)",
            f"Target: KL to FP at most {_fmt(k.get('max_kl'), 'g')} on the held-out windows; measured "
            f"{_fmt(k.get('kl_before'), '.4g')} with every linear in int8, {_fmt(k.get('kl_after'), '.4g')} with "
            f"{len(kept)} kept in float ({'met' if k.get('met') else 'NOT met'}). "
            + (f"Kept (costliest first, by the KL each adds alone in int8 on {k.get('rank_tokens')} calibration "
               f"tokens): {names}; they add {_mem(k.get('extra_bytes')) or '0 B'} over int8."
               if kept else "No linear had to be kept.")]
