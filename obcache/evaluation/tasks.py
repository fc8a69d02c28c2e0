"""RULER-style long-context tasks, generated offline and deterministically.

After RULER (Hsieh et al., 2024, https://arxiv.org/abs/2404.06654): a haystack of
Jargon File sentences (see text.py) with short "needle" sentences inserted at
sentence boundaries, a question asked after it, and an answer prefix that starts
the assistant turn (a small chat model like SmolLM2-135M-Instruct answers far
better with one). Needles:

- niah_*: "One of the special magic {numbers|words|uuids} for {key} is: {value}."
  Keys are adjective-noun words ("curious-lantern"), numbers have 7 digits,
  words are adjective-noun pairs, uuids are version-4 UUIDs, all drawn from a
  seeded RNG.
- niah_multiquestion: the needles of niah_multikey, each key asked in its own
  question; all questions are answered on one compressed cache (query-agnostic
  only), as after compressing a document once for many questions (KVzip's setting).
- variable_tracking: chains "VAR ABCDE = 12345.", "VAR FGHIJ = VAR ABCDE.", ...
  (RULER's vt: 5-letter names, 5-digit values, 4 hops). RULER uses one chain;
  here a second, distractor chain with another value is interleaved, so the
  answer needs the chain resolved, not every VAR listed.

Length: `tokenizer.encode(sample.context, add_special_tokens=False)` has
`length` tokens, within LENGTH_TOLERANCE (in practice exact for ~97% of samples,
otherwise 1 or 2 tokens off).
Depth: a needle at depth d sits at the sentence boundary closest to d times
the filler's tokens (0 = start of the context, 1 = its end), so its first token
is at about d * (length - n) tokens, n being all needles' tokens, plus the
tokens of needles placed before it. `depth` is the depth of the first needle;
the other needles' depths are drawn from the RNG, as is the first's when
depth=None.

    sample = make_sample("niah_single_number", tokenizer, 2048, seed=0, depth=0.5)
    # user turn: sample.context, a blank line, sample.question;
    # the assistant turn starts with sample.answer_prefix and the model continues it
    score_prediction(sample, prediction)   # 1.0 if the prediction holds the number
    exact_match(sample.task, sample.expected, prediction)   # 1.0 if its first number is the number
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, NamedTuple

from transformers import PreTrainedTokenizerBase

from obcache.text import count_tokens, filler_sentences

LENGTH_TOLERANCE = 8  # tokens a context may be off its target length
NUM_NEEDLES = 4  # keys of niah_multikey / niah_multiquery, values of niah_multivalue
VT_CHAINS = 2  # variable_tracking: the asked chain plus distractor chains
VT_HOPS = 4  # variable_tracking: assignments "VAR b = VAR a" per chain

# Built-in vocabulary for keys and word values: no adjective ends another, no noun starts another,
# so one "adjective-noun" word is never a substring of a different one.
ADJECTIVES = tuple(
    """
    amber ancient brave brisk calm clever copper crimson curious dapper distant dusty eager early
    elegant emerald fancy fierce frosty gentle gilded glossy golden graceful hollow humble icy idle
    jolly keen lively lofty loyal lucky marble mellow merry misty modest noble nimble olive orange pale
    patient plain polite proud quiet rapid rustic scarlet secret shiny silent silver sleepy smooth solid
    sturdy sunny swift tame tender tidy tiny velvet vivid wandering warm wary wild windy wise witty
    woven young zesty
    """.split()
)
NOUNS = tuple(
    """
    anchor apron arrow badger banjo barrel beacon blanket bottle bridge bucket button cabin camel candle
    canyon carpet castle cellar chimney cliff clock comet compass cottage crater dolphin drum eagle
    falcon feather fiddle forest fountain garden glacier goblet hammer harbor helmet island jacket
    kettle kitten ladder lantern lemon meadow mirror mitten orchard otter paddle parrot pebble pencil
    pillow planet pocket puzzle rabbit raven ribbon river rocket saddle sailor shovel spoon squirrel
    teapot thimble tiger tulip turtle valley violin wagon walnut whistle window wizard zebra
    """.split()
)


@dataclass(frozen=True)
class Sample:
    """One task instance.

    The prompt is `context`, then `question`; the model's answer starts with
    `answer_prefix`. `expected` holds every value the prediction must contain.
    `needle_spans` are the (start, end) character spans of all needles in
    `context`, in generation order: the first len(expected) spans hold the
    expected values in order (span i contains expected[i]), the rest are
    distractors; span 0 is the needle placed at `depth`. `length` and `depth`
    are the requested ones (`depth` None: drawn from the RNG).
    """

    task: str
    length: int
    depth: float | None
    seed: int
    context: str
    question: str
    answer_prefix: str
    expected: tuple[str, ...]
    needle_spans: tuple[tuple[int, int], ...]
    followups: tuple["Question", ...] = ()  # niah_multiquestion: the other questions, each on its own


class Question(NamedTuple):
    """One more question on a sample's context, answered on its own."""

    question: str
    answer_prefix: str
    expected: tuple[str, ...]


@dataclass(frozen=True)
class _Niah:
    """A needle-in-a-haystack variant, as RULER's num_needle_k / _v / _q."""

    value_type: str  # "number", "word" or "uuid"
    keys: int = 1  # keys with needles: the first `queries` are asked, the others are distractors
    values: int = 1  # needles (distinct values) per key
    queries: int = 1
    separate: bool = False  # each asked key in its own question (niah_multiquestion)


_NIAH: dict[str, _Niah] = {
    "niah_single_number": _Niah("number"),
    "niah_single_word": _Niah("word"),
    "niah_single_uuid": _Niah("uuid"),
    "niah_multikey": _Niah("number", keys=NUM_NEEDLES),
    "niah_multivalue": _Niah("number", values=NUM_NEEDLES),
    "niah_multiquery": _Niah("number", keys=NUM_NEEDLES, queries=NUM_NEEDLES),
    "niah_multiquestion": _Niah("number", keys=NUM_NEEDLES, queries=NUM_NEEDLES, separate=True),
}

TASKS: dict[str, str] = {
    "niah_single_number": "Retrieve the 7-digit number of one needle.",
    "niah_single_word": "Retrieve the word of one needle.",
    "niah_single_uuid": "Retrieve the UUID of one needle.",
    "niah_multikey": f"Retrieve the number of one key among {NUM_NEEDLES - 1} distractor needles with other keys.",
    "niah_multivalue": f"Retrieve all {NUM_NEEDLES} numbers given for one key.",
    "niah_multiquery": f"Retrieve the numbers of {NUM_NEEDLES} keys asked at once.",
    "niah_multiquestion": f"Retrieve the numbers of {NUM_NEEDLES} keys, each asked in its own question on one "
    "compressed cache (query-agnostic).",
    "variable_tracking": f"List the {VT_HOPS + 1} variables a chain of assignments gives one value "
    f"({VT_CHAINS - 1} distractor chain).",
}


class _Parts(NamedTuple):
    """What a task generator draws: needles as (text, depth), and the question side."""

    needles: list[tuple[str, float]]
    question: str
    answer_prefix: str
    expected: tuple[str, ...]
    followups: tuple[Question, ...] = ()


def _word(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


_VALUES: dict[str, Callable[[random.Random], str]] = {
    "number": lambda rng: str(rng.randint(1_000_000, 9_999_999)),
    "word": _word,
    "uuid": lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
}


def _distinct(rng: random.Random, draw: Callable[[random.Random], str], n: int) -> list[str]:
    """n distinct values of draw(rng), in drawing order."""
    values: dict[str, None] = {}
    while len(values) < n:
        values[draw(rng)] = None
    return list(values)


def _names(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _niah(spec: _Niah, rng: random.Random, depth: float | None) -> _Parts:
    """Needles, question and expected values of a needle-in-a-haystack variant."""
    keys = _distinct(rng, _word, spec.keys)
    values = _distinct(rng, _VALUES[spec.value_type], spec.keys * spec.values)
    texts = [
        f"One of the special magic {spec.value_type}s for {key} is: {value}."
        for k, key in enumerate(keys)
        for value in values[k * spec.values : (k + 1) * spec.values]
    ]
    depths = [depth if depth is not None else rng.random()] + [rng.random() for _ in texts[1:]]
    if spec.separate:
        questions = [_question(spec.value_type, key, (value,)) for key, value in zip(keys, values)]
        return _Parts(list(zip(texts, depths)), *questions[0], tuple(questions[1:]))
    expected = tuple(values[: spec.queries * spec.values])
    asked = _names(keys[: spec.queries])
    if len(expected) == 1:
        question = f"What is the special magic {spec.value_type} for {asked} mentioned in the text above?"
        prefix = f"The special magic {spec.value_type} for {asked} is"
    else:
        question = f"What are all the special magic {spec.value_type}s for {asked} mentioned in the text above?"
        prefix = f"The special magic {spec.value_type}s for {asked} are"
    question += f" Answer with the {spec.value_type}{'s' if len(expected) > 1 else ''} only."
    return _Parts(list(zip(texts, depths)), question, prefix, expected)


def _question(value_type: str, key: str, expected: tuple[str, ...]) -> Question:
    """The question on one key with one value."""
    question = f"What is the special magic {value_type} for {key} mentioned in the text above? Answer with the {value_type} only."
    return Question(question, f"The special magic {value_type} for {key} is", expected)


def _variable_tracking(rng: random.Random, depth: float | None) -> _Parts:
    """Needles, question and expected variable names of variable tracking."""
    size = VT_HOPS + 1
    names = _distinct(rng, lambda r: "".join(r.choices(string.ascii_uppercase, k=5)), VT_CHAINS * size)
    values = _distinct(rng, lambda r: str(r.randint(10_000, 99_999)), VT_CHAINS)
    needles: list[tuple[str, float]] = []
    for c, value in enumerate(values):
        chain = names[c * size : (c + 1) * size]
        texts = [f"VAR {chain[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(chain)]
        if c == 0 and depth is not None:  # the asked chain starts at `depth`
            depths = [depth] + sorted(rng.uniform(depth, 1.0) for _ in range(VT_HOPS))
        else:
            depths = sorted(rng.random() for _ in range(size))
        needles += zip(texts, depths)
    question = (
        f"Find all variables that are assigned the value {values[0]} in the text above. "
        "Answer with the variable names only."
    )
    prefix = f"The {size} variables assigned the value {values[0]} are"
    return _Parts(needles, question, prefix, tuple(names[:size]))


def _insert_needles(
    tokenizer: PreTrainedTokenizerBase, filler: list[str], needles: list[tuple[str, float]]
) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Join `filler` sentences with each needle at the sentence boundary closest to its depth.

    Depths are fractions of the filler's tokens; needles at the same boundary keep their
    order in `needles`. Returns the text (pieces joined by single spaces) and the needles'
    character spans, in the order of `needles`.
    """
    counts = [len(ids) for ids in tokenizer([" " + s for s in filler], add_special_tokens=False)["input_ids"]]
    boundaries = list(itertools.accumulate(counts, initial=0))  # token offset before each sentence, and the end
    slots = []
    for _, depth in needles:
        target = depth * boundaries[-1]
        i = bisect.bisect_left(boundaries, target)  # boundaries[i - 1] < target <= boundaries[i]
        if i > 0 and target - boundaries[i - 1] <= boundaries[i] - target:
            i -= 1
        slots.append(i)
    pieces: list[tuple[str, int | None]] = []  # (text, needle index or None for filler)
    for slot in range(len(filler) + 1):
        pieces += [(text, j) for j, (text, _) in enumerate(needles) if slots[j] == slot]
        if slot < len(filler):
            pieces.append((filler[slot], None))
    offsets = itertools.accumulate((len(text) + 1 for text, _ in pieces), initial=0)
    spans = {j: (start, start + len(text)) for (text, j), start in zip(pieces, offsets) if j is not None}
    return " ".join(text for text, _ in pieces), tuple(spans[j] for j in range(len(needles)))


def make_sample(
    task: str, tokenizer: PreTrainedTokenizerBase, length: int, *, seed: int, depth: float | None = None
) -> Sample:
    """A reproducible sample of `task` whose context has `length` tokens (see the module docstring).

    Keys, values, needle depths and the filler's starting sentence all come from one RNG seeded
    with (task, length, depth, seed): samples are independent of each other and of call order.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive number of tokens, got {length!r}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1] or None, got {depth!r}")
    rng = random.Random(f"{task}|{length}|{depth}|{seed}")
    parts = _variable_tracking(rng, depth) if task == "variable_tracking" else _niah(_NIAH[task], rng, depth)
    needle_tokens = sum(count_tokens(tokenizer, " " + text) for text, _ in parts.needles)
    if length < 2 * needle_tokens:
        raise ValueError(
            f"length={length} is too small for {task}: its needles take {needle_tokens} tokens "
            f"and must fill at most half of the context (length >= {2 * needle_tokens})"
        )
    filler = filler_sentences(tokenizer, length - needle_tokens, seed=rng.getrandbits(64))
    context, spans = _insert_needles(tokenizer, filler, parts.needles)
    error = count_tokens(tokenizer, context) - length
    if abs(error) > LENGTH_TOLERANCE:
        raise RuntimeError(f"{task}: context has {length + error} tokens instead of {length}; tokenizer not additive?")
    return Sample(task, length, depth, seed, context, parts.question, parts.answer_prefix, parts.expected, spans,
                  parts.followups)


def score_prediction(sample: Sample | Question, prediction: str) -> float:
    """RULER's string match ("string_match_all"): the fraction of `sample.expected` found in
    `prediction`, case-insensitive; 1.0 when all are there."""
    text = prediction.lower()
    return sum(value.lower() in text for value in sample.expected) / len(sample.expected)


#: What a value looks like in an answer, by value type (variable_tracking's are "name"s).
VALUE_SHAPES: dict[str, re.Pattern] = {
    "number": re.compile(r"\d+"),
    "word": re.compile(r"\b[a-z]+(?:-[a-z]+)+\b", re.IGNORECASE),
    "uuid": re.compile(r"\b[0-9a-f]+(?:-[0-9a-f]+)+\b", re.IGNORECASE),
    "name": re.compile(r"(?<![A-Z])[A-Z]{5}(?![A-Z])"),
}


def exact_match(task: str, expected: Sequence[str], prediction: str) -> float:
    """1.0 if the first len(expected) values in `prediction` (runs of the task's value shape, VALUE_SHAPES: digits
    for numbers) are exactly the expected values, in any order and case; else 0.0.

    Stricter than `score_prediction`: '53049088' contains the needle 5304908, but its first number is not it.
    """
    shape = VALUE_SHAPES["name" if task == "variable_tracking" else _NIAH[task].value_type]
    found = shape.findall(prediction)[: len(expected)]
    return float(sorted(value.lower() for value in found) == sorted(value.lower() for value in expected))


def questions(sample: Sample) -> list[Question]:
    """Every question of a sample, each answered on its own: the main one, then its follow-ups."""
    return [Question(sample.question, sample.answer_prefix, sample.expected), *sample.followups]
