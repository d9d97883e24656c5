"""configs/bench.yaml as frozen, validated dataclasses (unknown keys and wrong types are errors, as for
recipes: llmq.config.build), the row list it defines, and the settings key that makes rows resumable."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmq.config import Calibration as _QuantizeCalibration
from llmq.config import build
from llmq.errors import ConfigError

ROW_KINDS = ("fp", "llmq", "peer")
FP_DTYPES = ("float32", "half", "float16", "bfloat16")
GROUPS = ("main", "decode", "sim")  # --only
_QUANTIZE_CALIBRATION = _QuantizeCalibration()


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(f"bench config: {msg}")


@dataclass(frozen=True)
class Evaluation:
    data: str = "llmq:wiki"
    seq_len: int = 1024
    max_tokens: int = 20480
    extra_data: tuple[str, ...] = ()  # more texts (any llmq.data.load_text source): KL, top-1, perplexity

    def __post_init__(self) -> None:
        _check(self.seq_len >= 2 and self.max_tokens >= 2, "evaluation needs seq_len >= 2 and max_tokens >= 2")
        _check(self.data not in self.extra_data and len(set(self.extra_data)) == len(self.extra_data),
               "evaluation.extra_data must not repeat a text")

    @property
    def texts(self) -> tuple[str, ...]:
        return (self.data, *self.extra_data)


@dataclass(frozen=True)
class Calibration:  # defaults: `llmq quantize`'s (llmq.config.Calibration), so rows calibrate as users do
    source: str = _QUANTIZE_CALIBRATION.source
    samples: int = _QUANTIZE_CALIBRATION.samples
    seq_len: int = _QUANTIZE_CALIBRATION.seq_len
    seed: int = _QUANTIZE_CALIBRATION.seed
    spread_seeds: tuple[int, ...] = ()  # calibrating rows are quantized again with each and evaluated

    def __post_init__(self) -> None:
        _check(self.samples >= 1 and self.seq_len >= 2, "calibration needs samples >= 1 and seq_len >= 2")
        _check(self.seed not in self.spread_seeds, "calibration.spread_seeds must not repeat calibration.seed")

    def recipe_keys(self) -> dict[str, Any]:
        return {f"calibration.{k}": getattr(self, k) for k in ("source", "samples", "seq_len", "seed")}


@dataclass(frozen=True)
class Timing:
    calib_forward_windows: int = 8  # one FP forward over the calibration tokens = mean window time x samples
    speed_windows: int = 3  # windows timed interleaved (row evaluator, FP32 evaluator, row bare loop)


@dataclass(frozen=True)
class Decode:
    prompt_tokens: int = 512
    new_tokens: int = 128
    warmup: int = 1
    repeats: int = 5
    rows: tuple[str, ...] = ("smoothquant-auto", "llm-int8", "weight-only")  # int8 rows timed at decode
    rest: tuple[str, ...] = ("float32", "half")  # dtypes of their non-int8 parts
    bases: tuple[str, ...] = ("float32", "half")  # FP models timed beside each, in the same process

    def __post_init__(self) -> None:
        from llmq.speed import Decode as _Decode

        _Decode(prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens, repeats=self.repeats,
                warmup=self.warmup)  # the library's checks
        for d in (*self.rest, *self.bases):
            _check(d in FP_DTYPES, f"decode dtypes must be among {FP_DTYPES}, got {d!r}")
        _check(bool(self.bases), "decode.bases needs at least one FP model to compare against")


@dataclass(frozen=True)
class Simulate:
    max_tokens: int = 2048
    grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    auto_grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    auto_tokens: int = 512
    groups: tuple[str, ...] = ("attn", "mlp", "v_o", "up_down")
    modes: tuple[tuple[str, ...], ...] = ()  # [activations, weights] pairs

    def __post_init__(self) -> None:
        _check(0.0 in self.grid, "simulate.grid must include 0 (naive)")
        _check(all(len(m) == 2 for m in self.modes), "simulate.modes are [activations, weights] pairs")


@dataclass(frozen=True)
class Row:
    name: str
    kind: str = "llmq"
    dtype: str | None = None  # fp rows
    recipe: str | None = None  # llmq rows; "{model_type}" is filled in
    set: dict[str, Any] | None = None  # llmq rows: recipe overrides

    def __post_init__(self) -> None:
        _check(self.kind in ROW_KINDS, f"row {self.name!r}: kind must be one of {ROW_KINDS}, got {self.kind!r}")
        _check(self.kind != "fp" or self.dtype in FP_DTYPES, f"fp row {self.name!r} needs dtype in {FP_DTYPES}")
        _check(self.kind != "llmq" or bool(self.recipe), f"llmq row {self.name!r} needs a recipe")
        _check(self.set is None or isinstance(self.set, dict), f"row {self.name!r}: set must be a mapping")


@dataclass(frozen=True)
class BenchConfig:
    model: str = "llmq:smollm2"
    device: str = "auto"
    half_dtype: str = "auto"  # bfloat16 on CPU, float16 on CUDA
    evaluation: Evaluation = field(default_factory=Evaluation)
    calibration: Calibration = field(default_factory=Calibration)
    timing: Timing = field(default_factory=Timing)
    decode: Decode = field(default_factory=Decode)
    simulate: Simulate = field(default_factory=Simulate)
    rows: tuple[Row, ...] = ()
    threads: int | None = None  # torch threads per row (None: torch's default)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rows]
        _check(len(set(names)) == len(names), f"row names repeat: {names}")
        _check(self.half_dtype in ("auto", "float16", "bfloat16"), "half_dtype must be auto, float16 or bfloat16")
        quant = {r.name for r in self.rows if r.kind != "fp"}
        bad = [r for r in self.decode.rows if r not in quant]
        _check(not bad, f"decode.rows {bad} are not int8 rows of this config ({sorted(quant)})")


OVERRIDES = {  # CLI flag -> config path
    "max_tokens": "evaluation.max_tokens", "seq_len": "evaluation.seq_len", "extra_data": "evaluation.extra_data",
    "calib_samples": "calibration.samples", "spread_seeds": "calibration.spread_seeds",
    "sim_max_tokens": "simulate.max_tokens", "decode_repeats": "decode.repeats",
    "decode_prompt_tokens": "decode.prompt_tokens", "decode_new_tokens": "decode.new_tokens", "threads": "threads",
}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> BenchConfig:
    """Read and validate a bench YAML; `overrides` maps OVERRIDES keys (CLI flags) to values (None: unset)."""
    import yaml

    p = Path(path)
    _check(p.is_file(), f"{str(p)!r} does not exist; use configs/bench.yaml")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    _check(isinstance(data, dict), f"{p} must be a mapping")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *sections, last = OVERRIDES[key].split(".")
        node = data
        for s in sections:
            node = node.setdefault(s, {})
        node[last] = value
    return build(BenchConfig, data, str(p))


def half_dtype(cfg: BenchConfig) -> str:
    if cfg.half_dtype != "auto":
        return cfg.half_dtype
    from llmq.load import resolve_device

    return "float16" if resolve_device(cfg.device).type == "cuda" else "bfloat16"


def dtype_name(cfg: BenchConfig, dtype: str) -> str:
    return half_dtype(cfg) if dtype == "half" else dtype


def row_list(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Every row: the config's (group main), then decode-<row> (decode), then sim-<mode> (sim)."""
    from bench_api import sim_mode

    rows = [{**dataclasses.asdict(r), "group": "main"} for r in cfg.rows]
    rows += [{"name": f"decode-{n}", "kind": "decode", "source": n, "group": "decode"} for n in cfg.decode.rows]
    for act, weight in cfg.simulate.modes:
        rows.append({"name": f"sim-{sim_mode(act, weight).name}", "kind": "sim", "act": act, "weight": weight,
                     "group": "sim"})
    return rows


def select(rows: list[dict[str, Any]], patterns: list[str] | None, groups: list[str] | None) -> list[dict]:
    """Rows whose name matches one of `patterns` (fnmatch; None: all) and whose group is in `groups`."""
    bad = sorted(set(groups or ()) - set(GROUPS))
    _check(not bad, f"--only takes {', '.join(GROUPS)}; got {bad}")
    for p in patterns or ():
        _check(any(fnmatch.fnmatchcase(r["name"], p) for r in rows),
               f"--rows {p!r} matches no row; rows: {[r['name'] for r in rows]}")
    return [r for r in rows if (not patterns or any(fnmatch.fnmatchcase(r["name"], p) for p in patterns))
            and (not groups or r["group"] in groups)]


def settings_key(cfg: BenchConfig, model: str, row: dict[str, Any]) -> str:
    """Hash of every setting the row's numbers depend on (a decode row: its source row's key too)."""
    keep: dict[str, Any] = {"model": model, "row": row, "device": cfg.device, "half": cfg.half_dtype,
                            "threads": cfg.threads}
    if row["kind"] == "decode":
        src = next(r for r in row_list(cfg) if r["name"] == row["source"])
        keep.update(decode=dataclasses.asdict(cfg.decode), data=cfg.evaluation.data,
                    source=settings_key(cfg, model, src))
    else:
        keep.update(evaluation=dataclasses.asdict(cfg.evaluation), timing=dataclasses.asdict(cfg.timing))
        if row["kind"] != "fp":  # FP rows never calibrate
            keep["calibration"] = dataclasses.asdict(cfg.calibration)
        if row["kind"] == "sim":
            keep["simulate"] = {k: v for k, v in dataclasses.asdict(cfg.simulate).items() if k != "modes"}
        if row["kind"] != "sim" and row["name"] in cfg.decode.rows:
            keep["keeps_checkpoint"] = True
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=list).encode()).hexdigest()[:12]
