"""Memory accounting: bytes held by a model's tensors, and peak memory over a block of code.

On CUDA the peak is `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; on CPU it is
the process peak resident set size (VmHWM), reset on entry through /proc/self/clear_refs when the
kernel allows it (otherwise the peak is since process start, and `peak_since_start` says so).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Quantized state that bitsandbytes keeps as plain attributes, not parameters or buffers:
# Int8Params.CB/.SCB, and Linear8bitLt.state.CB/.SCB after the first forward (init_8bit_state).
_EXTRA_STATE = ("CB", "SCB")


def _tensors(model: torch.nn.Module) -> Any:
    for t in model.parameters():
        yield t
        for name in _EXTRA_STATE:  # Int8Params.CB is the weight itself; dedup below counts it once
            yield getattr(t, name, None)
    yield from model.buffers()
    for m in model.modules():
        state = getattr(m, "state", None)
        for name in _EXTRA_STATE:
            yield getattr(state, name, None)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters, buffers and bitsandbytes quantization state, shared tensors counted once."""
    seen: dict[tuple[str, int], int] = {}
    for t in _tensors(model):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
            continue
        key = (str(t.device), t.data_ptr())
        seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
    return sum(seen.values())


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    raise OSError(f"{field} not found in /proc/self/status")


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError as e:  # read-only /proc, non-Linux, old kernel
        log.debug("cannot reset the RSS high-water mark (%s); peak is since process start", e)
        return False


class PeakMemory:
    """Context manager measuring peak memory on `device` ("cuda[:N]" -> allocator stats, else process RSS).

    After exit: `peak_bytes`, `baseline_bytes` (at entry), `reserved_bytes` (CUDA only, else None),
    `kind` ("cuda" or "cpu-rss"), `peak_since_start` (CPU: True if the peak could not be reset).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.kind = "cuda" if self.device.type == "cuda" else "cpu-rss"
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.reserved_bytes: int | None = None
        self.peak_since_start = False

    @property
    def above_baseline_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.peak_since_start = not _reset_rss_peak()
            self.baseline_bytes = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
        else:
            self.peak_bytes = _status_bytes("VmHWM")


def trim_heap() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed activations (its mmap threshold grows with
    them), so without this the resident size creeps up window after window and layer after layer."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (not Linux, or not glibc: e.g. musl). Looked up once: `find_library` runs
    a subprocess, and the stage trims after every linear."""
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux"):
        try:
            return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
            log.debug("malloc_trim is not available here")
    return None


def release() -> None:
    """Return freed memory to the system after dropping a model: collect cycles, hand the freed heap back
    (glibc keeps freed blocks, which would stay in the resident set and in the next model's peak), empty the
    CUDA cache."""
    import gc

    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
