"""Tests for obcache.text and obcache.evaluation.tasks, with the real SmolLM2 tokenizer."""

from __future__ import annotations

import re

import pytest

from obcache import text
from obcache.evaluation.tasks import (
    ADJECTIVES,
    LENGTH_TOLERANCE,
    NOUNS,
    TASKS,
    VT_HOPS,
    exact_match,
    make_sample,
    questions,
    score_prediction,
)
from obcache.loading import load_tokenizer

SINGLE = ["niah_single_number", "niah_single_word", "niah_single_uuid"]
NEEDLE = re.compile(r"One of the special magic (\w+)s for ([a-z]+-[a-z]+) is: ([\w-]+)\.")
ASSIGNMENT = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))\.")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def tokens(tokenizer, string: str) -> int:
    return len(tokenizer.encode(string, add_special_tokens=False))


# --- text ---------------------------------------------------------------------------------------


def test_shipped_text():
    assert (text.DATA_DIR / "jargon.txt.gz").stat().st_size < 1_000_000
    jargon = text.load_text()
    assert text.load_text() is jargon  # cached
    assert len(jargon.split()) > 150_000 and "hacker" in jargon
    assert not re.search(r"\{\w[^{}]*\}", jargon) and "\u2500" not in jargon  # no {cross-references}, no tables
    with pytest.raises(ValueError, match="available: jargon"):
        text.load_text("pg19")


def test_split_sentences():
    paragraph = 'See e.g. the FOO entry. He said "Stop!" Then J. Random Hacker left. 42 is (an answer.) Done'
    assert text.split_sentences(paragraph) == [
        "See e.g. the FOO entry.", 'He said "Stop!"', "Then J. Random Hacker left.", "42 is (an answer.)", "Done"
    ]


@pytest.mark.parametrize("n_tokens", [1, 37, 512, 3000])
def test_filler_length_and_sentences(tokenizer, n_tokens):
    pool = set(text.sentences())
    for seed in range(3):
        filler = text.filler_sentences(tokenizer, n_tokens, seed=seed)
        assert abs(tokens(tokenizer, " ".join(filler)) - n_tokens) <= 2
        assert all(sentence in pool for sentence in filler[:-1])  # whole sentences but the last
    starts = {text.filler_sentences(tokenizer, 50, seed=seed)[0] for seed in range(3)}
    assert len(starts) == 3  # the seed picks the start
    with pytest.raises(ValueError, match="positive"):
        text.filler_sentences(tokenizer, 0, seed=0)


def test_document_ids(tokenizer):
    ids = text.document_ids(tokenizer, 5000, seed=1)
    assert len(ids) == 5000 and ids == text.document_ids(tokenizer, 5000, seed=1)
    assert ids != text.document_ids(tokenizer, 5000, seed=2)
    assert tokenizer.decode(ids[:500]).split("\n")[0] in text.load_text()  # starts at a paragraph
    with pytest.raises(ValueError, match="exceeds the whole text"):
        text.document_ids(tokenizer, 10_000_000)


# --- tasks: structure -----------------------------------------------------------------------------


def test_vocabulary():
    assert len(set(ADJECTIVES)) == len(ADJECTIVES) and len(set(NOUNS)) == len(NOUNS)
    # "adjective-noun" words never contain one another
    assert not [(a, b) for a in ADJECTIVES for b in ADJECTIVES if a != b and b.endswith(a)]
    assert not [(a, b) for a in NOUNS for b in NOUNS if a != b and b.startswith(a)]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [512, 2048, 4096])
def test_length_and_spans(tokenizer, task, length):
    sample = make_sample(task, tokenizer, length, seed=length, depth=0.5)
    assert abs(tokens(tokenizer, sample.context) - length) <= LENGTH_TOLERANCE
    assert (sample.task, sample.length, sample.depth, sample.seed) == (task, length, 0.5, length)
    assert len(sample.needle_spans) >= len(sample.expected)
    for value, (start, end) in zip(sample.expected, sample.needle_spans):
        assert value in sample.context[start:end]
    ordered = sorted(sample.needle_spans)
    assert all(end < next_start for (_, end), (next_start, _) in zip(ordered, ordered[1:]))  # disjoint
    for start, end in sample.needle_spans:  # needles are whole sentences between spaces
        assert start == 0 or sample.context[start - 1] == " "
        assert end == len(sample.context) or sample.context[end] == " "
    assert sample.answer_prefix and sample.question.endswith("only.")


@pytest.mark.parametrize("task", SINGLE)
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_needle_depth(tokenizer, task, depth):
    length = 2048
    sample = make_sample(task, tokenizer, length, seed=7, depth=depth)
    ((start, end),) = sample.needle_spans
    needle_tokens = tokens(tokenizer, " " + sample.context[start:end])
    position = tokens(tokenizer, sample.context[:start])
    assert abs(position / (length - needle_tokens) - depth) < 0.04
    if depth == 0.0:
        assert start == 0
    elif depth == 1.0:
        assert end == len(sample.context)
    else:  # at a sentence boundary
        assert re.search(r"[.!?][\"')\]]*$", sample.context[:start].rstrip())


# --- tasks: answers are recoverable from the context, with independent parsers --------------------


@pytest.mark.parametrize("task", [t for t in TASKS if t.startswith("niah")])
def test_niah_answer_in_context(tokenizer, task):
    sample = make_sample(task, tokenizer, 1024, seed=3)
    found: dict[str, list[str]] = {}
    for kind, key, value in NEEDLE.findall(sample.context):
        assert kind in ("number", "word", "uuid") and kind in sample.question
        found.setdefault(key, []).append(value)
    asked = [key for key in found if key in sample.question]
    assert asked and all(key in sample.answer_prefix for key in asked)
    assert tuple(sorted(v for key in asked for v in found[key])) == tuple(sorted(sample.expected))
    expected_needles = {"niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4, "niah_multiquestion": 4}.get(task, 1)
    assert sum(map(len, found.values())) == len(sample.needle_spans) == expected_needles
    for question in questions(sample)[1:]:  # niah_multiquestion: every key asked on its own, its needle's value
        (key,) = [key for key in found if key in question.question]
        assert key in question.answer_prefix and question.expected == tuple(found[key])
    if task == "niah_multiquestion":
        assert len(questions(sample)) == len(found) == 4


def test_variable_tracking_chain(tokenizer):
    for seed in range(4):
        sample = make_sample("variable_tracking", tokenizer, 2048, seed=seed)
        value = re.search(r"the value (\d+)", sample.question).group(1)
        resolved: dict[str, str] = {}
        for name, source, number in ASSIGNMENT.findall(sample.context):
            resolved[name] = number or resolved[source]  # KeyError if used before it is assigned
        assert {name for name, v in resolved.items() if v == value} == set(sample.expected)
        assert len(sample.expected) == VT_HOPS + 1 and str(VT_HOPS + 1) in sample.answer_prefix
        assert len(resolved) > len(sample.expected)  # a distractor chain with another value


# --- tasks: reproducibility -----------------------------------------------------------------------


@pytest.mark.parametrize("task", ["niah_single_uuid", "niah_multiquery", "variable_tracking"])
def test_reproducible(tokenizer, task):
    sample = make_sample(task, tokenizer, 1024, seed=5, depth=0.3)
    assert make_sample(task, tokenizer, 1024, seed=5, depth=0.3) == sample
    other = make_sample(task, tokenizer, 1024, seed=6, depth=0.3)
    assert other.context != sample.context and other.expected != sample.expected
    moved = make_sample(task, tokenizer, 1024, seed=5, depth=0.8)
    assert moved.needle_spans[0][0] > sample.needle_spans[0][0]


# --- scoring and validation -----------------------------------------------------------------------


def test_score_prediction(tokenizer):
    sample = make_sample("niah_multivalue", tokenizer, 512, seed=0)
    a, b, c, d = sample.expected
    assert score_prediction(sample, f" {d}, {c}, {b} and {a}.") == 1.0
    assert score_prediction(sample, f" {a} and {c}, I think.") == 0.5
    assert score_prediction(sample, " 1234567.") == 0.0
    uuid_sample = make_sample("niah_single_uuid", tokenizer, 512, seed=0)
    assert score_prediction(uuid_sample, uuid_sample.expected[0].upper()) == 1.0  # case-insensitive


@pytest.mark.parametrize("task,expected,prediction,exact", [
    ("niah_single_number", ("5304908",), " 5304908.", 1.0),
    ("niah_single_number", ("5304908",), " 53049088.", 0.0),  # RULER's string match counts it (contains)
    ("niah_single_number", ("5304908",), " 530490.", 0.0),
    ("niah_single_number", ("5304908",), " It is 5304908, not 1234567.", 1.0),
    ("niah_single_number", ("5304908",), " 1234567, or 5304908.", 0.0),  # the first number decides
    ("niah_single_number", ("5304908",), " five million", 0.0),
    ("niah_multivalue", ("1111111", "2222222", "3333333"), " 3333333, 1111111 and 2222222.", 1.0),  # any order
    ("niah_multivalue", ("1111111", "2222222", "3333333"), " 3333333, 1111111 and 22222222.", 0.0),
    ("niah_multivalue", ("1111111", "2222222", "3333333"), " 3333333 and 1111111.", 0.0),
    ("niah_single_word", ("curious-lantern",), " Curious-Lantern.", 1.0),
    ("niah_single_word", ("curious-lantern",), " curious-lanterns.", 0.0),
    ("niah_single_uuid", ("0a1b2c3d-0000-4000-8000-0123456789ab",), " 0A1B2C3D-0000-4000-8000-0123456789AB", 1.0),
    ("niah_single_uuid", ("0a1b2c3d-0000-4000-8000-0123456789ab",), " 0a1b2c3d-0000-4000-8000-0123456789abc", 0.0),
    ("variable_tracking", ("ABCDE", "FGHIJ"), " VAR FGHIJ, VAR ABCDE.", 1.0),
    ("variable_tracking", ("ABCDE", "FGHIJ"), " ABCDEF, FGHIJ.", 0.0),
])
def test_exact_match_reads_the_first_values_of_the_answer(task, expected, prediction, exact):
    assert exact_match(task, expected, prediction) == exact


def test_validation(tokenizer):
    with pytest.raises(ValueError, match="unknown task 'niah'.*available: niah_single_number"):
        make_sample("niah", tokenizer, 512, seed=0)
    for depth in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
            make_sample("niah_single_number", tokenizer, 512, seed=0, depth=depth)
    for length in (0, -5, "512", True, 512.0):
        with pytest.raises(ValueError, match="length must be a positive"):
            make_sample("niah_single_number", tokenizer, length, seed=0)
    with pytest.raises(ValueError, match="too small for variable_tracking"):
        make_sample("variable_tracking", tokenizer, 100, seed=0)
    with pytest.raises(ValueError, match="too small for niah_single_uuid"):
        make_sample("niah_single_uuid", tokenizer, 40, seed=0)
