"""The simulated W8A8 rows of scripts/benchmark.py: the SmoothQuant paper's O1-O3 granularities in float32."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from bench_config import BenchConfig, Calibration


def stats_path(work: Path, cal: Calibration, groups: Any, auto_tokens: int) -> Path:
    keep = {k: getattr(cal, k) for k in ("source", "samples", "seq_len", "seed")}
    key = hashlib.sha1(json.dumps([keep, sorted(groups), auto_tokens], sort_keys=True).encode()).hexdigest()
    return work / f"calibration-{key[:8]}.safetensors"


def save_stats(stats, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {**{f"max/{k}": v.contiguous() for k, v in stats.act_max.items()},
               **{f"row/{k}": v.contiguous() for k, v in stats.samples.items()},
               "tokens": torch.tensor(stats.tokens)}
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def sim_stats(m, tok, cfg: BenchConfig, work: Path):
    """Per-channel abs-max of every linear's input plus auto_tokens rows per group. The smoothquant-auto row
    leaves exactly these (same windows, groups and seed) in the work folder; else calibrate once here."""
    from bench_api import calibration_windows
    from bench_rows import calib_recipe
    from safetensors.torch import load_file

    from llmq.calibrate import CalibrationStats, calibrate
    from llmq.quantize import linear_names
    from llmq.smooth import smooth_targets

    sim, cal = cfg.simulate, cfg.calibration
    path = stats_path(work, cal, sim.groups, sim.auto_tokens)
    names = linear_names(m, ("lm_head",))
    if path.is_file():
        d = load_file(str(path))
        stats = CalibrationStats(act_max={k[4:]: v for k, v in d.items() if k.startswith("max/")},
                                 samples={k[4:]: v for k, v in d.items() if k.startswith("row/")},
                                 tokens=int(d["tokens"]))
        if set(names) <= set(stats.act_max):
            return stats
    targets = smooth_targets(m, sim.groups)
    stats = calibrate(m, calibration_windows(tok, calib_recipe(cfg)), names,
                      sample_names=tuple(t.linear_names[0] for t in targets), sample_tokens=sim.auto_tokens,
                      seed=cal.seed, progress=False)
    save_stats(stats, path)
    return stats


def row_sim(row: dict, cfg: BenchConfig, model_id: str, work: Path, progress: bool) -> dict[str, Any]:
    from bench_api import sim_mode, simulated_perplexity
    from bench_rows import eval_ids
    from tqdm.auto import tqdm

    from llmq.evaluate import evaluate_ids
    from llmq.load import load
    from llmq.quantize import linear_names

    sim, ev = cfg.simulate, cfg.evaluation
    mode = sim_mode(row["act"], row["weight"])
    m, tok = load(model_id, dtype="float32", device=cfg.device)
    ids = eval_ids(tok, ev.data, sim.max_tokens)
    stats = sim_stats(m, tok, cfg, work)
    names = linear_names(m, ("lm_head",))
    base = {k: v.detach().clone() for k, v in m.state_dict().items()}
    fp = evaluate_ids(m, ids, ev.seq_len, progress=False, max_tokens=sim.max_tokens, data=ev.data)
    points = []
    for a in tqdm([*sim.grid, "auto"], desc=mode.name, disable=not progress):
        t0 = time.perf_counter()
        p = simulated_perplexity(m, base, ids, ev.seq_len, stats, mode, a, names=names, groups=list(sim.groups),
                                 grid=tuple(sim.auto_grid))
        p["seconds"] = time.perf_counter() - t0
        if a != "auto":
            p.pop("alphas")
        points.append(p)
    return {"mode": mode.name, "act": mode.act, "weight": mode.weight, "fp_perplexity": fp.perplexity,
            "tokens": fp.tokens, "protocol": fp.protocol, "calibration_tokens": stats.tokens, "points": points}
