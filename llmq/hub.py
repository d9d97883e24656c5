"""Publish an llmq output folder to the Hugging Face Hub: model card + one commit. The only module that
imports huggingface_hub.

Everything that can be checked locally (folder, repo id, offline mode, token, secrets in files) is checked
before the first request. The token is only ever handed to `HfApi`: it is never printed, logged or written,
and error messages are built here (huggingface_hub's may quote request details), then scrubbed of it.
A failed push leaves the folder as it was; `llmq push DIR REPO` retries without re-quantizing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .card import CARD, model_card, write_card
from .config import offline
from .errors import PushError
from .report import REPORT, read_report

__all__ = ["PushResult", "check_push_args", "model_card", "push", "upload_files", "write_card"]
log = logging.getLogger(__name__)

# Never uploaded: editor/OS leftovers, partial writes, locks (hidden paths are skipped as well).
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".incomplete", ".lock", ".swp", "~")
_SCAN_LIMIT = 64 * 2**20  # files up to this size are searched for the token before upload
_REDACT = re.compile(r"\bhf_[A-Za-z0-9]{30,}|(?i:(?<=bearer )\S+)")
_URL_QUERY = re.compile(r"(https?://[^\s?]+)\?\S+")  # presigned URLs carry credentials in the query


@dataclass(frozen=True)
class PushResult:
    """What a push sent (or, for a dry run, would send)."""

    repo_id: str
    revision: str
    files: list[str]  # sorted paths relative to the folder
    commit_url: str | None  # None for dry runs
    dry_run: bool


def upload_files(folder: str | Path) -> list[str]:
    """Sorted relative paths of every file `push` uploads: all but hidden, temporary and symlinked ones."""
    root = Path(folder)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinked folders
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if name.startswith(".") or name.endswith(TEMP_SUFFIXES):
                continue
            if p.is_symlink():  # could point anywhere (a token file, a home folder): never follow it
                log.warning("not uploading %s: it is a symbolic link", rel)
                continue
            out.append(rel)
    return sorted(out)


def push(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, dry_run: bool = False, token: str | None = None,
         progress: bool = True) -> PushResult:
    """Upload an llmq output folder to `repo_id` as one commit (repo and branch created if missing).

    Writes README.md (the model card) first if the folder has none; otherwise the folder is not touched.
    Token: `token`, else `HF_TOKEN`, else the stored login (`hf auth login`). `dry_run` checks everything
    that needs no network and returns the files that would go, without any request."""
    src = Path(folder).expanduser()
    _check_folder(src, folder)
    tok = _check(repo_id, revision, token, dry_run)
    branch = revision or "main"
    retry = _retry_cmd(src, repo_id, revision, private)
    if not (src / CARD).is_file():
        try:
            write_card(src, repo_id)
        except OSError as e:
            raise PushError(f"cannot write the model card {CARD} into {src} ({e.strerror or e}); make the "
                            "folder writable, or add a README.md yourself") from None
    files = upload_files(src)
    if tok:
        _check_no_token_in(src, files, tok)
    total = sum((src / f).stat().st_size for f in files)
    if dry_run:
        log.info("dry run: would push %d files (%.1f MiB) from %s to %s@%s", len(files), total / 2**20, src,
                 repo_id, branch)
        return PushResult(repo_id, branch, files, None, True)

    from huggingface_hub import CommitOperationAdd, HfApi, constants

    from . import __version__

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=tok, library_name="llmq", library_version=__version__)
    message = commit_message or _default_message(src)
    log.info("pushing %d files (%.1f MiB) from %s to %s/%s@%s", len(files), total / 2**20, src, endpoint,
             repo_id, branch)
    step = "creating the repository"
    try:
        with _progress_bars(progress):
            api.create_repo(repo_id, private=True if private else None, exist_ok=True)
            if branch != "main":
                step = f"creating the branch {branch!r}"
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            step = "uploading"
            ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(src / f)) for f in files]
            # One commit with the exact file list (what upload_folder does inside), so dry_run and the real
            # push share one list; huggingface_hub picks regular/LFS/Xet per file as the Hub asks.
            info = api.create_commit(repo_id, ops, commit_message=message, revision=revision)
    except _failures() as err:
        raise PushError(_explain(err, step=step, repo_id=repo_id, endpoint=endpoint, folder=src, retry=retry,
                                 token=tok)) from None
    log.info("pushed %s@%s: %s", repo_id, branch, info.commit_url)
    return PushResult(repo_id, branch, files, str(info.commit_url), False)


def check_push_args(repo_id: str, *, revision: str | None = None, token: str | None = None) -> None:
    """Fail now (PushError) on what would make a later push fail before any upload: a bad repo id or
    revision, offline mode, no token. For `llmq quantize --push`, before the expensive work."""
    _check(repo_id, revision, token, dry_run=False)


# --- checks -----------------------------------------------------------------------------------------
def _check(repo_id: str, revision: str | None, token: str | None, dry_run: bool) -> str | None:
    """Validate without network; returns the token to use (None only for dry runs without one)."""
    _check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise PushError("--revision must be a branch name such as `main` or `int8`, got an empty string")
    if not dry_run and offline():
        raise PushError("HF_HUB_OFFLINE=1 is set, which blocks every Hub request; unset it to push")
    tok = (token or os.environ.get("HF_TOKEN") or "").strip() or (None if dry_run else _stored_token())
    if not tok and not dry_run:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token needs write "
                        "access to the repo's namespace)")
    return tok


def _check_folder(src: Path, given: str | Path) -> None:
    how = "make one with `llmq quantize MODEL --out DIR`, then push DIR"
    if not src.is_dir():
        raise PushError(f"{str(given)!r} is not a folder; push expects an llmq output folder ({how})")
    missing = [n for n in ("config.json", REPORT) if not (src / n).is_file()]
    if missing:
        raise PushError(f"{str(given)!r} is not an llmq output folder (missing {', '.join(missing)}); {how}")


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    form = ("expected the form `user/name` or `org/name`: letters, digits, '-', '_' and '.', at most 96 "
            "characters, no '--' or '..'")
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise PushError(f"repo id {repo_id!r} is not valid; {form}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PushError(f"repo id {repo_id!r} is not valid; {form}") from None


def _stored_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _check_no_token_in(src: Path, files: list[str], token: str) -> None:
    needle = token.encode()
    for f in files:
        p = src / f
        if p.stat().st_size <= _SCAN_LIMIT and needle in p.read_bytes():
            raise PushError(f"{f} in {src} contains your Hugging Face token; remove it from the file before "
                            "pushing (nothing was uploaded)")


# --- helpers ----------------------------------------------------------------------------------------
def _retry_cmd(src: Path, repo_id: str, revision: str | None, private: bool) -> str:
    cmd = f"llmq push {shlex.quote(str(src))} {repo_id}"
    cmd += f" --revision {shlex.quote(revision)}" if revision else ""
    return cmd + (" --private" if private else "")


def _default_message(src: Path) -> str:
    try:
        method = read_report(src).method
    except PushError:
        method = "int8"
    return f"Upload INT8 ({method}) model made with llmq"


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    turn_off = not show and not are_progress_bars_disabled()
    if turn_off:
        disable_progress_bars()
    try:
        yield
    finally:
        if turn_off:
            enable_progress_bars()


def _network_errors() -> tuple[type[BaseException], ...]:
    import socket

    types: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for mod in ("httpx2", "httpx"):  # huggingface_hub >= 1.0 talks HTTP through httpx(2)
        with contextlib.suppress(ImportError):
            types.append(__import__(mod).TransportError)
    with contextlib.suppress(ImportError):  # huggingface_hub < 1.0 used requests
        from requests.exceptions import ConnectionError as RequestsConnectionError
        from requests.exceptions import Timeout

        types += [RequestsConnectionError, Timeout]
    return tuple(types)


def _failures() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError

    # RuntimeError/ValueError: huggingface_hub wraps LFS upload failures and malformed server answers in them;
    # OSError: a file that vanished or became unreadable during the upload.
    return (HfHubHTTPError, RuntimeError, ValueError, OSError, *_network_errors())


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _explain(err: BaseException, *, step: str, repo_id: str, endpoint: str, folder: Path, retry: str,
             token: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    intact = f"the local output in {folder} is intact; re-run `{retry}` to retry — no re-quantization needed"
    status = next((e.response.status_code for e in _chain(err)
                   if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None), None)
    net = next((e for e in _chain(err) if isinstance(e, _network_errors())), None)
    # hf_xet refuses with its own PermissionError subclass, not an HTTP error
    xet_refused = any(type(e).__name__ == "XetAuthenticationError" for e in _chain(err))
    if status in (401, 403) or (status is None and xet_refused):
        ns, why = repo_id.split("/")[0], status or "Xet storage"
        msg = (f"the token was refused ({why}) for {repo_id}; check it has write access (see "
               f"https://huggingface.co/settings/tokens) to the namespace {ns!r}; {intact}")
    elif status == 404:
        msg = (f"{repo_id} (or its branch) was not found (404) while {step}; check the namespace exists and "
               f"the token may write to it; {intact}")
    elif status is not None:
        msg = f"the Hub at {endpoint} answered HTTP {status} while {step} for {repo_id}; {intact}"
    elif net is not None:
        msg = (f"cannot reach the Hub at {endpoint} while {step} ({type(net).__name__}); check network, "
               f"HF_ENDPOINT; {intact}")
    else:
        detail = _URL_QUERY.sub(r"\1?***", (str(err).strip().splitlines() or [""])[0][:200])
        msg = f"push to {repo_id} failed while {step}: {type(err).__name__}: {detail}; {intact}"
    log.debug("push failed while %s: %s", step, type(err).__name__)
    return _REDACT.sub("***", msg.replace(token, "***") if token else msg).replace("\n", " ")
