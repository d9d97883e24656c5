"""Memory budgets: sizes with units, `--max-memory` per device, and what is free now."""

from __future__ import annotations

import re

import torch

from .errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'24GiB' / '20GB' / '512MiB' / '1000000' (bytes) -> bytes."""
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"memory size {text!r} is not understood; write a number with a unit: GiB, GB, "
                          "MiB, MB or bytes (e.g. 24GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def main_device_key() -> int | str:
    return 0 if torch.cuda.is_available() else "cpu"


def parse_max_memory(spec: str) -> dict[int | str, int]:
    """'24GiB' (the main device: cuda:0 if present, else cpu) or '0=20GiB,1=20GiB,cpu=64GiB' -> bytes per
    device, the `max_memory` accelerate and transformers take."""
    if not spec or not spec.strip():
        raise ConfigError("--max-memory is empty; give e.g. 24GiB or 0=20GiB,cpu=64GiB")
    if "=" not in spec:
        return {main_device_key(): parse_size(spec)}
    out: dict[int | str, int] = {}
    for part in spec.split(","):
        key, sep, size = part.partition("=")
        key = key.strip().lower().removeprefix("cuda:")
        if not sep or not (key.isdigit() or key in ("cpu", "mps")):
            raise ConfigError(f"--max-memory entry {part.strip()!r} is not DEVICE=SIZE; devices are GPU "
                              "indices (0, 1, ...) or cpu, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
        dev: int | str = int(key) if key.isdigit() else key
        if dev in out:
            raise ConfigError(f"--max-memory names device {dev!r} twice in {spec!r}")
        out[dev] = parse_size(size)
    return out


def detected_budget() -> dict[int | str, int]:
    """What is free now on the main device: CUDA free memory of GPU 0, else the CPU's MemAvailable."""
    if torch.cuda.is_available():
        return {0: int(torch.cuda.mem_get_info(0)[0])}
    from pathlib import Path

    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return {"cpu": int(line.split()[1]) * 1024}
    raise ConfigError("cannot read the available memory here; pass --max-memory (e.g. --max-memory 16GiB)")
