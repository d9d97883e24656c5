"""What the code chose in each calibrating row, per calibration seed: the storage dtype of the non-int8 parts
(llmq/storage.py, with its reason) and the guard's pick with every candidate's held-out KL (llmq/guard.py)."""

from __future__ import annotations

from typing import Any


def choice_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name, r in results.items():
        q = r.get("quantize") or {}
        if r.get("kind") != "llmq" or r.get("skipped"):
            continue
        runs = [{"seed": r.get("recipe", {}).get("calibration", {}).get("seed"), "storage": q.get("storage"),
                 "guard": q.get("guard")}, *(r.get("spread") or [])]
        out += [{"row": name, **run} for run in runs]
    return out


def choice_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not any(r["storage"] or r["guard"] for r in rows):
        return []
    lines = ["#### What the code chose", "",
             "Per calibrating row and calibration seed: the dtype the non-int8 parts were stored in (`--storage-dtype "
             "auto`: float16 when the largest activation or weight measured on the calibration windows is within "
             "half the float16 range, else bfloat16) and, with `--alpha auto`, the model the guard shipped: each "
             "candidate's KL vs FP32 on calibration windows held out from calibration and the alpha search.", "",
             "| row | seed | non-int8 parts | guard shipped | held-out KL of each candidate (tokens) |",
             "|---|---|---|---|---|"]
    for r in rows:
        st, g = r["storage"] or {}, r["guard"] or {}
        vmax = st.get("value_max")
        store = st.get("dtype", "-") + (f" (max {vmax:.3g})" if isinstance(vmax, float) else "")
        cands = ", ".join(f"{k} {v['kl_divergence']:.4g}" for k, v in (g.get("candidates") or {}).items())
        lines.append(f"| {r['row']} | {r['seed']} | {store} | {g.get('chosen', '-')} | "
                     f"{cands + ' (' + str(g['held_out_tokens']) + ')' if cands else '-'} |")
    return lines + [""]
