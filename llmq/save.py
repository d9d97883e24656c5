"""Atomic output folders and the quantized checkpoint layout.

Everything is written into a hidden temporary folder beside the destination and renamed into place at the
end, so an error, Ctrl-C or SIGTERM never leaves a half-written output, and an existing output is only
replaced (with --overwrite) once the new one is complete. Output folders are made to be shared: their files
get the permissions a plain `open()` gives (0644 under the usual umask; safetensors writes 0600), and the
JSON written here names no local absolute path (llmq/provenance.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError

log = logging.getLogger(__name__)
TMP_MARK = ".llmq-tmp-"


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Validate the destination before any expensive work; returns it resolved."""
    p = Path(out).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise OutputError(f"output {str(out)!r} is a file; give a folder path for --out")
    if p.exists() and not overwrite:
        raise OutputError(f"output {str(out)!r} already exists; pass --overwrite to replace it, or choose "
                          "another --out")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{str(parent)!r} is not a folder, so --out {str(out)!r} cannot be made in it; "
                          "choose another --out")
    try:  # a real write: os.access says yes to root, on read-only mounts and in /proc
        os.rmdir(tempfile.mkdtemp(prefix=f".{p.name}{TMP_MARK}probe-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write into {str(parent)!r} ({e.strerror or e}); choose another --out") \
            from None
    return p


def check_output_file(path: str | Path, flag: str = "--json") -> Path:
    """Validate a file destination (e.g. --json) before any expensive work: its folder exists and takes files."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"{flag} {str(path)!r} is a folder; give a file path")
    if not p.parent.is_dir():
        raise OutputError(f"{flag} {str(path)!r}: the folder {str(p.parent)!r} does not exist; create it or "
                          f"choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=p.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {str(path)!r}: cannot write into {str(p.parent)!r} ({e.strerror or e}); "
                          f"choose another {flag}") from None
    return p


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `out`, on any exception it is removed."""
    dest = check_output(out, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}{TMP_MARK}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _readable_(tmp)
        if dest.exists():
            if not overwrite:
                raise OutputError(f"output {str(out)!r} appeared while running; not replacing it")
            old = dest.parent / f".{dest.name}{TMP_MARK}old-{os.getpid()}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _readable_(folder: Path) -> None:
    """Files 0666 and folders 0777 minus the umask, as open() and mkdir() make them (mkstemp-style writers,
    safetensors among them, leave 0600: unreadable to the other users of a shared model folder)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON, local absolute paths in its strings reduced to their last component."""
    from .provenance import public

    data = json.loads(json.dumps(data, default=str))  # plain JSON types first, so every string is seen
    text = json.dumps(public(data), indent=2, sort_keys=False)
    path.write_text(text + "\n", encoding="utf-8")


def save_checkpoint(model, tokenizer, folder: Path) -> None:
    """Weights (safetensors only), config with quantization_config, tokenizer and generation config."""
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(folder)
    stray = [f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if stray:  # defensive: never ship pickle files
        raise OutputError(f"refusing to write non-safetensors files {stray}")
