"""Rebuild `jargon.txt.gz` from the Debian `jargon-text` package (Jargon File 4.4.7).

Run once, by hand, when the shipped text must be regenerated:

    apt-get install jargon-text
    python scripts/build_jargon.py /usr/share/doc/jargon-text/jargon.txt.gz

Keeps prose paragraphs only (no headwords, tables, tables of contents, code or
cartoon captions), joins each paragraph onto one line, drops the `{cross-reference}`
braces and maps typographic punctuation to ASCII. The output is deterministic
(gzip without a timestamp).
"""

from __future__ import annotations

import gzip
import re
import sys
from pathlib import Path

OUTPUT = Path(__file__).with_name("jargon.txt.gz")
PUNCTUATION = str.maketrans(  # curly quotes, dashes, ellipsis, no-break space -> ASCII
    {"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"}
    | {"\u2014": "-", "\u2013": "-", "\u2026": "...", "\u00a0": " "}
)
MIN_WORDS = 12


def clean_paragraph(lines: list[str]) -> str | None:
    """One blank-line separated block as a single prose line, or None to drop it."""
    if any("\u2500" <= ch <= "\u257f" for line in lines for ch in line):  # box drawing: tables
        return None
    text = " ".join(line.strip() for line in lines).translate(PUNCTUATION)
    text = re.sub(r"\{+([^{}]*)\}+", r"\1", text)  # {cross reference} -> cross reference
    text = re.sub(r"^\d+\.\s+", "", text)  # sense numbers "2. ..."
    text = re.sub(r"\s+", " ", text).strip()
    if text.startswith(("(The next cartoon", "(The previous cartoon", "(This is the first cartoon")):
        return None
    if text.startswith(":") or len(text.split()) < MIN_WORDS or not re.search(r"[.!?][\"')]*$", text):
        return None
    visible = text.replace(" ", "")
    if sum(ch.isalpha() for ch in visible) < 0.8 * len(visible):  # code, addresses, number lists
        return None
    return text


def paragraphs(raw: str) -> list[str]:
    """The cleaned prose paragraphs of the Jargon File text version, in order."""
    kept = []
    for block in re.split(r"\n[ \t]*\n", raw):
        text = clean_paragraph([line for line in block.splitlines() if line.strip()])
        if text is not None:
            kept.append(text)
    return kept


def main(source: str) -> None:
    raw = gzip.decompress(Path(source).read_bytes()).decode("utf-8")
    text = "\n".join(paragraphs(raw)) + "\n"
    with open(OUTPUT, "wb") as raw_file, gzip.GzipFile(fileobj=raw_file, mode="wb", mtime=0, filename="") as out:
        out.write(text.encode("utf-8"))
    print(f"{OUTPUT}: {len(text.split())} words, {OUTPUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
