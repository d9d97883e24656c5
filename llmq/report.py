"""The typed report of a quantization run: built once by a driver, written as `llmq_report.json`, read back by
the model card, the CLI and the benchmarks (attributes, not string keys)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import PushError

log = logging.getLogger(__name__)
REPORT = "llmq_report.json"


@dataclass
class CalibrationInfo:
    """What the activation maxima and auto-alpha rows were measured on."""

    source: str
    samples: int | None = None
    seq_len: int | None = None
    seed: int | None = None
    tokens: int | None = None
    act_scales: str | None = None
    statistic: str = "max"  # llmq.config.STATISTICS ("max", the only one before the option)

    @classmethod
    def of(cls, cal, tokens: int | None) -> CalibrationInfo:
        """From a llmq.config.Calibration and the number of tokens it ran."""
        return cls(cal.source, cal.samples, cal.seq_len, cal.seed, tokens, cal.act_scales, cal.statistic)


@dataclass
class QuantizeInfo:
    """Cost of the quantization itself."""

    seconds: float
    peak_memory_bytes: int | None = None
    baseline_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    device: str = ""
    mode: str = "in-memory"


@dataclass
class Report:
    """Everything a run did and measured; `evaluation` holds EvalResult dicts keyed "fp" and "int8"."""

    method: str
    threshold: float
    skip: list[str] = field(default_factory=list)
    gptq: bool = False  # weights rounded by llmq/gptq.py (error-compensated) rather than round-to-nearest
    gptq_sink: bool = False  # its Hessians weigh each window's first position as the rest (quantization.gptq_sink)
    storage: dict[str, Any] | None = None  # llmq/storage.py: dtype of the non-int8 tensors, and why
    rotation: dict[str, Any] | None = None  # llmq/rotate.py: kind, size, seed, parameters an untied lm_head added
    alpha: float | str | None = None  # as asked: a number, "auto", or None (no smoothing method)
    alphas: dict[str, float] | None = None  # chosen per smoothing group
    refined: dict[str, Any] | None = None  # auto: smoothing.refine's groups, and each refined group's error ratio
    calibration: CalibrationInfo | None = None
    quantize: QuantizeInfo | None = None
    evaluation: dict[str, dict[str, Any]] | None = None
    guard: dict[str, Any] | None = None  # llmq/guard.py: chosen, fell_back, held-out size, candidates' KL
    a16: dict[str, Any] | None = None  # quantization.a16: the W8A16 linears, the threshold, llmq/a16.py's scales
    keep: dict[str, Any] | None = None  # --max-kl: target, KL reached, linears kept in 16-bit, their cost
    llmq_version: str = ""
    base_model: str | None = None
    license: str | None = None
    command: str = ""
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Unknown keys are ignored with a log line (a newer llmq may have written them); missing ones default."""
        names = {f.name for f in fields(cls)}
        extra = sorted(set(data) - names)
        if extra:
            log.info("report keys not known to this llmq version: %s", extra)
        kw = {k: v for k, v in data.items() if k in names}
        for key, sub in (("calibration", CalibrationInfo), ("quantize", QuantizeInfo)):
            if isinstance(kw.get(key), dict):
                known = {f.name for f in fields(sub)}
                try:
                    kw[key] = sub(**{k: v for k, v in kw[key].items() if k in known})
                except TypeError:
                    kw[key] = None  # incomplete section: shown as "not measured"
            elif key in kw:
                kw[key] = None
        kw.setdefault("method", "unknown")
        kw.setdefault("threshold", float("nan"))
        return cls(**kw)

    def write(self, folder: Path, scrub: Callable[[Any], Any] = lambda d: d) -> None:
        """Write `llmq_report.json` into `folder`, passed through `scrub` (e.g. provenance.public: no local paths)."""
        (Path(folder) / REPORT).write_text(json.dumps(scrub(self.to_dict()), indent=2, default=str) + "\n",
                                           encoding="utf-8")


def read_report(folder: str | Path) -> Report:
    """The run's `llmq_report.json`; PushError if the folder is not an llmq output."""
    path = Path(folder) / REPORT
    if not path.is_file():
        raise PushError(f"{str(folder)!r} is not an llmq output folder (no {REPORT}); make one with "
                        "`llmq quantize MODEL --out DIR`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PushError(f"{str(path)!r} is not valid JSON ({e.__class__.__name__}); re-run `llmq quantize` "
                        "to regenerate the folder") from None
    if not isinstance(data, dict):
        raise PushError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return Report.from_dict(data)
