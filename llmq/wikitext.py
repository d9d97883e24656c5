"""MediaWiki XML dump -> WikiText-style plain text (the format of WikiText-103 "raw").

Kept: article prose and link text. Dropped: list and indented lines (``*``, ``#``, ``:``, ``;``), templates
``{{...}}`` (nested), tables ``{|...|}``, ``<ref>`` notes, comments, ``<math>``/``<gallery>``-like blocks,
file/image/category and interlanguage links, bold/italic quotes, HTML tags (their content is kept), and the
trailing reference-like sections (References, External links, ...). An article starts with a `` = Title = ``
line, a level-n section heading becomes `` = = X = = `` with n equal signs on each side; blocks are separated
by one blank line and articles by one blank line.

The ``llmq:wiki`` split. The cleaned text is its articles, in dump order, joined by one blank line
(``"\\n\\n"``), plus a final newline. Let ``N`` be the text's length in characters and ``e_k`` the end
offset of article ``k`` (1-based). With ``k*`` the smallest ``k`` such that ``e_k >= f * N`` (``f`` = 0.8;
clipped to ``1 <= k* <= articles - 1``), the "evaluation" part is articles ``1..k*`` and the "calibration"
part is articles ``k*+1..end``, each part joined by ``"\\n\\n"``. The parts are disjoint, together they hold
every article, and the evaluation part is a prefix of the file, so the first T tokens of the evaluation part
are the first T tokens of the whole text.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET

from .errors import AssetError

# Sections that hold citations and links rather than prose (their bodies become noise once
# templates are gone); WikiText-103 is prose-only, so they are dropped with their subsections.
DROP_SECTIONS = frozenset({
    "references", "external links", "see also", "further reading", "notes", "footnotes",
    "bibliography", "sources", "citations", "notes and references", "references and notes",
    "works cited", "notes and citations",
})
_BLOCK_TAGS = "math|gallery|timeline|score|imagemap|source|syntaxhighlight|references|chem|ce|hiero"
_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF = re.compile(r"<ref\b[^>]*/\s*>|<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_BLOCK = re.compile(rf"<({_BLOCK_TAGS})\b[^>]*/\s*>|<({_BLOCK_TAGS})\b[^>]*>.*?</\2\s*>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^<>]*/?>")
_DROP_LINK = re.compile(r"\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z-]+)?)\s*:", re.I)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-Z]+__")


def parse_dump(xml_text: str | bytes) -> list[tuple[str, str]]:
    """(title, wiki markup) of each main-namespace article; redirects and disambiguation pages skipped."""
    root = ET.fromstring(xml_text)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    out = []
    for page in root.iter(f"{ns}page"):
        title = page.findtext(f"{ns}title") or ""
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        if title.endswith("(disambiguation)"):
            continue
        out.append((title, page.findtext(f"{ns}revision/{ns}text") or ""))
    return out


def remove_nested(text: str, open_: str, close: str) -> str:
    """Remove every balanced ``open_ ... close`` span, nesting included; an unclosed one runs to the end."""
    out, depth, i, start = [], 0, 0, 0
    while True:
        o, c = text.find(open_, i), text.find(close, i)
        if depth == 0:
            if o < 0:
                out.append(text[start:])
                return "".join(out)
            out.append(text[start:o])
            depth, i = 1, o + len(open_)
        elif c < 0:
            return "".join(out)  # unclosed: drop the rest
        elif 0 <= o < c:
            depth, i = depth + 1, o + len(open_)
        else:
            depth, i = depth - 1, c + len(close)
            if depth == 0:
                start = i


def _drop_special_links(text: str) -> str:
    """Remove [[File:...]], [[Category:...]], [[fr:...]] links, whose captions may hold nested links."""
    out, i = [], 0
    while True:
        j = text.find("[[", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        m = _DROP_LINK.match(text, j + 2)
        if not m or m.group(1).lower() in ("wikt", "s"):
            out.append("[[")
            i = j + 2
            continue
        depth, k = 1, j + 2
        while depth and k < len(text):
            if text.startswith("[[", k):
                depth, k = depth + 1, k + 2
            elif text.startswith("]]", k):
                depth, k = depth - 1, k + 2
            else:
                k += 1
        i = k


def _link_text(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if label:
        return label.split("|")[-1]
    if m.group(1).endswith("|"):  # pipe trick: [[Foo (bar)|]] -> Foo
        return re.sub(r"\s*\(.*\)$", "", target.split(":")[-1])
    return target.lstrip(":")


def clean_markup(markup: str) -> str:
    """Wiki markup of one article body -> plain text blocks separated by blank lines."""
    t = _COMMENT.sub("", markup)
    t = _REF.sub("", t)
    t = _BLOCK.sub("", t)
    t = remove_nested(t, "{{", "}}")
    t = remove_nested(t, "{|", "|}")
    t = _drop_special_links(t)
    t = _LINK.sub(_link_text, t)
    t = _EXT_LINK.sub(lambda m: m.group(1), t)
    t = _QUOTES.sub("", t)
    t = _TAG.sub("", t)
    t = _MAGIC.sub("", t)
    t = html.unescape(t).replace("\xa0", " ").replace("\u2009", " ")
    blocks, dropping_level = [], 0
    for raw in t.split("\n"):
        line = re.sub(r"[ \t]+", " ", raw).strip()
        h = _HEADING.match(line)
        if h:
            level, name = len(h.group(1)), h.group(2).strip()
            if dropping_level and level > dropping_level:
                continue
            dropping_level = level if name.lower() in DROP_SECTIONS else 0
            if not dropping_level and name:
                blocks.append(" " + "= " * level + name + " =" * level + " ")
            continue
        if dropping_level:
            continue
        if line.startswith(("*", "#", ":", ";")):  # lists and indented lines: not prose
            continue
        if re.search(r"\w", line):
            blocks.append(line)
    while blocks and blocks[-1].startswith(" = "):  # a heading left with no body
        blocks.pop()
    return "\n\n".join(_drop_empty_sections(blocks))


def _drop_empty_sections(blocks: list[str]) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if b.startswith(" = ") and out and out[-1].startswith(" = ") and _level(b) <= _level(out[-1]):
            out.pop()
        out.append(b)
    return out


def _level(heading: str) -> int:
    return heading.split(" ").count("=") // 2


def article(title: str, markup: str) -> str:
    """One article: the `` = Title = `` line, a blank line, then the cleaned body."""
    body = clean_markup(markup)
    return f" = {title} = " + (f"\n\n{body}" if body else "")


def dump_to_text(xml_text: str | bytes) -> str:
    """Every article of a dump, cleaned, joined by blank lines (the text of `llmq:wiki`)."""
    return "\n\n".join(article(t, m) for t, m in parse_dump(xml_text)) + "\n"


def split_articles(text: str) -> list[str]:
    """Inverse of the join in `dump_to_text`: the articles of a cleaned text, in order."""
    return re.split(r"\n\n(?= = [^=])", text.rstrip("\n"))


def split_wiki(text: str, fraction: float = 0.8) -> dict[str, str]:
    """The evaluation / calibration parts of a cleaned text, split by articles (the module docstring)."""
    articles = split_articles(text)
    if len(articles) < 2:
        raise AssetError(f"the cleaned wiki text has {len(articles)} article(s), expected 101; "
                         "delete it from the cache and fetch again")
    target, end, k = fraction * len(text), 0, 0
    while k < len(articles) - 1:
        end += len(articles[k]) + (2 if k else 0)
        k += 1
        if end >= target:
            break
    return {"evaluation": "\n\n".join(articles[:k]), "calibration": "\n\n".join(articles[k:])}
