"""Offline text shipped with the package: haystack filler and documents for perplexity.

The text lives in `data/` as gzip-compressed plain text, one paragraph a line
(see data/README.md for provenance and license). Nothing here touches the
network or system packages.

    filler = filler_sentences(tokenizer, 2000, seed=0)   # " ".join(filler) is 2000 tokens
    ids = document_ids(tokenizer, 8192)                  # running text for perplexity
"""

from __future__ import annotations

import gzip
import random
import re
from functools import lru_cache
from pathlib import Path

from transformers import PreTrainedTokenizerBase

DATA_DIR = Path(__file__).with_name("data")
TEXTS: dict[str, str] = {"jargon": "The Jargon File 4.4.7 (public domain), prose paragraphs, ~203k words."}

# A sentence ends at . ! or ? (plus closing quotes/brackets) before whitespace and a capital or digit.
_SENTENCE_END = re.compile(r"""[.!?]["')\]]*(?=\s+["'(\[]?[A-Z0-9])""")
# Words whose final period does not end a sentence.
_ABBREVIATIONS = frozenset(
    "e.g. i.e. etc. esp. cf. vs. viz. prob. approx. orig. abbrev. fig. vol. no. mr. mrs. ms. dr. st. jr. sr. "
    "inc. corp. ltd. n. adj. adv. v. vt. vi. interj. pl. alt. var. obs. syn.".split()
)


@lru_cache(maxsize=None)
def load_text(name: str = "jargon") -> str:
    """The whole text `name` (see TEXTS), paragraphs separated by newlines."""
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; available: {', '.join(TEXTS)}")
    return gzip.decompress((DATA_DIR / f"{name}.txt.gz").read_bytes()).decode("utf-8")


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences (a rule-based splitter that skips common abbreviations)."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(paragraph):
        last_word = paragraph[start : match.end()].rsplit(None, 1)[-1].lower().strip("\"'([")
        if last_word in _ABBREVIATIONS or re.fullmatch(r"[a-z]\.", last_word):  # abbreviation or initial
            continue
        sentences.append(paragraph[start : match.end()].strip())
        start = match.end()
    if paragraph[start:].strip():
        sentences.append(paragraph[start:].strip())
    return sentences


@lru_cache(maxsize=None)
def paragraphs(name: str = "jargon") -> tuple[str, ...]:
    """All paragraphs of text `name`, in order."""
    return tuple(load_text(name).splitlines())


@lru_cache(maxsize=None)
def sentences(name: str = "jargon") -> tuple[str, ...]:
    """All sentences of text `name`, in order."""
    return tuple(s for paragraph in paragraphs(name) for s in split_sentences(paragraph))


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Number of tokens of `text`, without special tokens."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def _take(
    tokenizer: PreTrainedTokenizerBase, pieces: tuple[str, ...], separator: str, n_tokens: int, start: int
) -> tuple[list[str], list[list[int]]]:
    """Consecutive pieces from index `start` (wrapping around) until they hold at least `n_tokens` tokens.

    Each piece but the first is encoded with `separator` in front, as it appears once joined.
    Returns the pieces and their token ids.
    """
    taken: list[str] = []
    ids: list[list[int]] = []
    total = 0
    for offset in range(len(pieces)):
        piece = pieces[(start + offset) % len(pieces)]
        piece_ids = tokenizer.encode(piece if not taken else separator + piece, add_special_tokens=False)
        taken.append(piece)
        ids.append(piece_ids)
        total += len(piece_ids)
        if total >= n_tokens:
            return taken, ids
    raise ValueError(f"n_tokens={n_tokens} exceeds the whole text ({total} tokens)")


def filler_sentences(
    tokenizer: PreTrainedTokenizerBase, n_tokens: int, *, seed: int, name: str = "jargon"
) -> list[str]:
    """Sentences of text `name` from a seed-chosen sentence on, `n_tokens` tokens once joined by spaces.

    All sentences are whole except the last, which is cut (possibly mid-word) to meet the length.
    `" ".join(result)` has exactly `n_tokens` tokens in practice; where the tokenizer merges
    differently across the cut, it is off by at most a token or two.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    pool = sentences(name)
    taken, ids = _take(tokenizer, pool, " ", n_tokens, random.Random(seed).randrange(len(pool)))
    head, last_ids = taken[:-1], ids[-1]
    keep = n_tokens - sum(len(piece_ids) for piece_ids in ids[:-1])
    for _ in range(4):  # re-measure: a cut mid-word can re-tokenize differently
        cut = tokenizer.decode(last_ids[:keep], clean_up_tokenization_spaces=False).strip()
        result = head + [cut] if cut else head
        error = count_tokens(tokenizer, " ".join(result)) - n_tokens
        if error == 0:
            break
        keep = min(max(keep - error, 0), len(last_ids))
    return result


def document_ids(
    tokenizer: PreTrainedTokenizerBase, n_tokens: int, *, seed: int = 0, name: str = "jargon"
) -> list[int]:
    """`n_tokens` token ids of running text (paragraphs kept) from a seed-chosen paragraph on.

    For perplexity: ordinary prose, no special tokens, wrapping around the end of the text.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    pool = paragraphs(name)
    _, ids = _take(tokenizer, pool, "\n", n_tokens, random.Random(seed).randrange(len(pool)))
    return [token for piece_ids in ids for token in piece_ids][:n_tokens]
