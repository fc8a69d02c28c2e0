"""The evaluation grid: every policy x score x budget on every sample, one prefill per sample.

    spec = EvalSpec(task="niah_single_number", policies=("snapkv",), scores=("attention", "obc-joint"),
                    budgets=(0.05, 0.1), lengths=(2048,), samples=3, out=Path("runs/niah"))
    run_eval(spec)        # appends rows to runs/niah/results.jsonl; a rerun resumes

Tasks: the RULER-style tasks of tasks.py (greedy answers scored by string
match), `fidelity` (fidelity.py) and `oracle` (oracle.py). The grid always has
the full-cache row, and StreamingLLM once per budget when asked. A sample is
(length, depth, sample index); its generator seed is `seed + index`.

Rows are appended to `out/results.jsonl` as each sample ends (one write,
flushed and fsynced). A row's identity is `row_key`; a rerun skips the rows
already there, and a half-written last line (a killed run) is cut off first.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from obcache.cli_args import build_policy
from obcache.evaluation.tasks import TASKS, make_sample, score_prediction
from obcache.layer_state import Selector
from obcache.policies import POLICIES, policy_allocation, policy_label, policy_options
from obcache.scores import check_score_kind

EXTRA_TASKS: dict[str, str] = {
    "fidelity": "Perplexity, KL and top-1 agreement vs the full cache on the next tokens of a document.",
    "oracle": "Future-query output error of each score's kept set vs a greedy oracle (captured layers).",
}
ALL_TASKS: dict[str, str] = {**TASKS, **EXTRA_TASKS}
FULL = "full"  # policy name of the full-cache row
KEY_FIELDS = ("model", "task", "length", "depth", "seed", "sample", "policy", "policy_repr", "score", "budget", "mode")
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation run. budgets: fraction kept in (0, 1] or tokens kept (see obcache.policies)."""

    task: str
    policies: tuple[str, ...] = ("h2o", "tova", "snapkv")
    scores: tuple[str, ...] = ("attention", "obc-value", "obc-key", "obc-joint")
    budgets: tuple[float | int, ...] = (0.05, 0.1, 0.2)
    lengths: tuple[int, ...] = (2048,)
    depths: tuple[float | None, ...] = (None,)
    samples: int = 1
    seed: int = 0
    query_aware: bool = False
    model: str | None = None
    out: Path = Path("results")
    options: dict = field(default_factory=dict)  # policy fields (window, kernel, ...), where a policy has them
    selections: tuple[str, ...] = ("per-head",)  # grid axes of the scored policies
    chunks: tuple[int, ...] = (1,)
    allocations: tuple[str, ...] = ("uniform",)
    alpha: float = 0.2  # adakv
    beta: float = 20.0  # pyramid
    max_new_tokens: int | None = None  # default: the expected answer's tokens + 8
    future: int = 256  # fidelity / oracle: tokens scored after the prompt
    layers: tuple[int, ...] | None = None  # oracle: captured layers (default: 4 spread over the model)
    oracle_step: float = 0.05  # oracle: fraction of the kept set removed per greedy round

    @property
    def mode(self) -> str:
        if self.task in EXTRA_TASKS:
            return "teacher-forced"
        return "query-aware" if self.query_aware else "query-agnostic"


def build_grid(spec: EvalSpec) -> dict[tuple[str, str | None, float | int | None], Selector | None]:
    """(policy label, score, budget) -> policy, the full cache first (raises ValueError on bad input).

    Scored policies run in every allocation x selection x chunk of the spec
    (AdaKV with shared selection excepted: it has no meaning); StreamingLLM once.
    """
    for name in spec.policies:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(POLICIES)}")
    for score in spec.scores:
        check_score_kind(score)
    unused = set(spec.options) - {f for name in spec.policies for f in policy_options(POLICIES[name])}
    if unused:
        raise ValueError(f"no chosen policy has the option(s) {', '.join(sorted(unused))}")
    grid: dict[tuple[str, str | None, float | int | None], Selector | None] = {(FULL, None, None): None}
    for name in spec.policies:
        scored = POLICIES[name].takes_score
        modes = itertools.product(spec.allocations, spec.selections, spec.chunks) if scored else [("uniform", "per-head", 1)]
        for allocation, selection, chunk in modes:
            if allocation == "adakv" and selection == "shared":
                continue
            for score in spec.scores if scored else (None,):
                for budget in spec.budgets:
                    options = {**spec.options, "selection": selection, "chunk": chunk}
                    policy = build_policy(name, budget=budget, score=score, options=options, allocation=allocation,
                                          alpha=spec.alpha, beta=spec.beta, strict=False)
                    grid[(policy_label(policy), score, budget)] = policy
    return grid


def check_spec(spec: EvalSpec) -> dict:
    """Validate everything that needs no model; return the grid. Creates the output folder."""
    if spec.task not in ALL_TASKS:
        raise ValueError(f"unknown task {spec.task!r}; available: {', '.join(ALL_TASKS)}")
    if not spec.budgets or not spec.lengths:
        raise ValueError("give at least one budget and one length")
    grid = build_grid(spec)
    if isinstance(spec.samples, bool) or not isinstance(spec.samples, int) or spec.samples < 1:
        raise ValueError(f"samples must be a positive int, got {spec.samples!r}")
    for length in spec.lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"lengths must be positive ints, got {length!r}")
        for policy in grid.values():
            if policy is not None:
                policy.check_prompt([length])
    for depth in spec.depths:
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths must lie in [0, 1], got {depth!r}")
    if spec.future < 2:
        raise ValueError(f"future must be >= 2 tokens, got {spec.future}")
    if not 0.0 < spec.oracle_step <= 1.0:
        raise ValueError(f"oracle_step must lie in (0, 1], got {spec.oracle_step}")
    try:
        spec.out.mkdir(parents=True, exist_ok=True)
        with open(spec.out / RESULTS_FILE, "a", encoding="utf-8"):
            pass
    except OSError as error:
        raise ValueError(f"output folder {str(spec.out)!r} is not writable: {error}") from None
    return grid


# ------------------------------------------------------------------ results file


def row_key(row: dict) -> tuple:
    """A row's identity: the same key is never written twice."""
    return tuple(json.dumps(row.get(name)) for name in KEY_FIELDS)


def read_rows(path: Path, *, repair: bool = False) -> list[dict]:
    """The complete rows of a results file; with `repair`, cut off a half-written last line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, good = [], 0
    for line in data.splitlines(keepends=True):
        try:
            if not line.endswith(b"\n"):
                raise ValueError("unterminated line")
            rows.append(json.loads(line))
        except ValueError:
            if good + len(line) != len(data):
                raise ValueError(f"{path}: corrupt line at byte {good}, not at the end; fix or remove it") from None
            if repair:
                print(f"obcache eval: dropping a half-written last line of {path}", file=sys.stderr)
                with open(path, "r+b") as file:
                    file.truncate(good)
            break
        good += len(line)
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows in one write, flushed and fsynced."""
    with open(path, "a", encoding="utf-8") as file:
        file.write("".join(json.dumps(row) + "\n" for row in rows))
        file.flush()
        os.fsync(file.fileno())


# ------------------------------------------------------------------ the run


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Four layers spread over the model: 1, L/3, 2L/3, L-1 (deduplicated)."""
    return tuple(sorted({min(1, num_layers - 1), num_layers // 3, 2 * num_layers // 3, num_layers - 1}))


def _units(spec: EvalSpec) -> Iterator[tuple[int, float | None, int]]:
    depths = (None,) if spec.task in EXTRA_TASKS else spec.depths
    for length in spec.lengths:
        for depth in depths:
            for index in range(spec.samples):
                yield length, depth, index


def run_eval(spec: EvalSpec, *, model=None, tokenizer=None, progress: bool = True) -> Path:
    """Run (or resume) the grid; return the results file. `model`/`tokenizer`: preloaded (tests)."""
    from tqdm import tqdm

    import obcache
    import transformers
    from obcache.loading import DEFAULT_MODEL, load_model

    grid = check_spec(spec)
    path = spec.out / RESULTS_FILE
    done = {row_key(row) for row in read_rows(path, repair=True)}
    model_name = spec.model or DEFAULT_MODEL
    base = {"model": model_name, "task": spec.task, "seed": spec.seed, "mode": spec.mode}
    todo = []
    for length, depth, index in _units(spec):
        unit = {**base, "length": length, "depth": depth, "sample": index}
        missing = [fields for fields in _expected_rows(spec, grid, length) if row_key({**unit, **fields}) not in done]
        if missing:
            todo.append((unit, missing))
    if not todo:
        return path
    if model is None:
        model, tokenizer = load_model(spec.model)
    layers = spec.layers or default_layers(model.config.num_hidden_layers)
    _check_window(spec, model, tokenizer)
    versions = {"obcache": obcache.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    total = sum(len(missing) for _, missing in todo)
    with tqdm(total=total, desc=f"{spec.task} ({spec.mode})", unit="row", file=sys.stderr, disable=not progress) as bar:
        for unit, missing in todo:
            start = time.perf_counter()
            wanted = {(f["policy"], f["score"], f["budget"]) for f in missing}
            policies = {key: policy for key, policy in grid.items() if key in wanted}
            if spec.task == "fidelity":
                rows = _fidelity_rows(spec, model, tokenizer, unit, policies)
            elif spec.task == "oracle":  # the oracle is compared with every score's set, even when resuming
                rows = _oracle_rows(spec, model, tokenizer, unit, grid, layers)
            else:
                rows = _task_rows(spec, model, tokenizer, unit, policies, bar.update)
            seconds = time.perf_counter() - start
            rows = [{**unit, **row, "versions": versions, "sample_seconds": seconds} for row in rows]
            append_rows(path, [row for row in rows if row_key(row) not in done])
            if spec.task in EXTRA_TASKS:
                bar.update(len(missing))
    return path


def _policy_fields(key: tuple, policy: Selector | None) -> dict:
    label, score, budget = key
    fields = {"policy": label, "policy_repr": repr(policy) if policy is not None else "full cache", "score": score,
              "budget": budget}
    if policy is not None:
        fields.update(selection=policy.selection, chunk=policy.chunk, allocation=policy_allocation(policy))
    return fields


def _oracle_fields(name: str, spec: EvalSpec, budget: float | int) -> dict:
    return {"policy": name, "policy_repr": f"{name}(step={spec.oracle_step})", "score": name, "budget": budget}


def _expected_rows(spec: EvalSpec, grid: dict, length: int) -> list[dict]:
    """The identifying fields of every row a sample of `length` tokens produces."""
    rows = [_policy_fields(key, policy) for key, policy in grid.items()]
    if spec.task == "oracle":
        for budget in _evicting_budgets(grid, length):
            rows += [_oracle_fields("oracle", spec, budget), _oracle_fields("greedy", spec, budget)]
    return rows


def _evicting_budgets(grid: dict, length: int) -> dict[float | int, int]:
    """budget -> tokens kept, for the budgets that evict something from a `length`-token prompt."""
    sizes = {policy.budget: policy.kept_tokens(length) for policy in grid.values() if policy is not None}
    return {budget: size for budget, size in sizes.items() if size < length}


def _check_window(spec: EvalSpec, model, tokenizer) -> None:
    """Every prompt plus its continuation must fit the model's position window (checked before any run)."""
    window = getattr(model.config, "max_position_embeddings", None)
    if window is None:
        return
    for length in spec.lengths:
        if spec.task in EXTRA_TASKS:
            needed = length + spec.future + 1
        else:
            sample = make_sample(spec.task, tokenizer, length, seed=spec.seed, depth=spec.depths[0])
            needed = sum(map(len, _prompt(sample, tokenizer))) + _max_new_tokens(spec, sample, tokenizer)
        if needed > window:
            raise ValueError(
                f"length {length} needs {needed} positions (prompt + continuation), more than the model's "
                f"window max_position_embeddings={window}"
            )


def _prompt(sample, tokenizer) -> tuple[list[int], list[int]]:
    from obcache.generation import build_prompt

    return build_prompt(tokenizer, sample.context, sample.question, answer_prefix=sample.answer_prefix)


def _max_new_tokens(spec: EvalSpec, sample, tokenizer) -> int:
    if spec.max_new_tokens is not None:
        return spec.max_new_tokens
    return len(tokenizer.encode(" " + ", ".join(sample.expected), add_special_tokens=False)) + 8


def _task_rows(spec: EvalSpec, model, tokenizer, unit: dict, missing: dict, advance) -> list[dict]:
    """Greedy answers of every missing policy to one RULER-style sample, from one prefill."""
    from obcache.evaluation.fanout import shared_prefill
    from obcache.generation import continue_greedy, eos_token_ids
    from obcache.hooks import attach

    sample = make_sample(spec.task, tokenizer, unit["length"], seed=spec.seed + unit["sample"], depth=unit["depth"])
    context_ids, question_ids = _prompt(sample, tokenizer)
    prefill_ids = context_ids + question_ids if spec.query_aware else context_ids
    rest_ids = [] if spec.query_aware else question_ids
    shared = shared_prefill(model, prefill_ids, missing)
    eos, max_new = eos_token_ids(model, tokenizer), _max_new_tokens(spec, sample, tokenizer)
    rows = []
    for key, policy in missing.items():
        cache = shared.evicted(key)
        kept, nbytes = cache.kept_tokens()[0], cache.nbytes()
        start = time.perf_counter()
        with attach(model):
            tokens = continue_greedy(model, cache, shared.logits, rest_ids, eos=eos, max_new_tokens=max_new)
        decode_seconds = time.perf_counter() - start
        prediction = tokenizer.decode(tokens, skip_special_tokens=True)
        rows.append({
            **_policy_fields(key, policy),
            "prompt_tokens": len(prefill_ids), "question_tokens": len(question_ids),
            "prediction": prediction, "expected": list(sample.expected),
            "correct": score_prediction(sample, prediction),
            "kept_tokens": kept, "cache_bytes": nbytes, "cache_bytes_full": shared.cache.nbytes(),
            "prefill_seconds": shared.prefill_seconds, "select_seconds": shared.select_seconds[key],
            "decode_seconds": decode_seconds,
        })
        advance(1)
    return rows


def _document(spec: EvalSpec, tokenizer, unit: dict) -> list[int]:
    from obcache.evaluation.text import document_ids

    return document_ids(tokenizer, unit["length"] + spec.future + 1, seed=spec.seed + unit["sample"])


def _fidelity_rows(spec: EvalSpec, model, tokenizer, unit: dict, missing: dict) -> list[dict]:
    from obcache.evaluation.fidelity import evaluate_fidelity

    ids = _document(spec, tokenizer, unit)
    results = evaluate_fidelity(model, ids, unit["length"], missing)
    return [
        {**_policy_fields(key, missing[key]), "future": spec.future, "perplexity": r.perplexity, "kl": r.kl,
         "top1": r.top1, "layer_errors": r.layer_errors, "kept_tokens": r.kept_tokens, "cache_bytes": r.cache_bytes,
         "forward_seconds": r.seconds}
        for key, r in results.items()
    ]


def _oracle_rows(spec: EvalSpec, model, tokenizer, unit: dict, grid: dict, layers: tuple[int, ...]) -> list[dict]:
    """Every policy's row, plus the oracle's and the greedy set's row per evicting budget."""
    from obcache.evaluation.oracle import evaluate_oracle

    ids = _document(spec, tokenizer, unit)[:-1]
    per_policy, oracle, greedy = evaluate_oracle(model, ids, unit["length"], grid, list(layers), step=spec.oracle_step)
    common = {"layers": list(layers), "future": spec.future}
    rows = [
        {**_policy_fields(key, policy), **common, "error": per_policy[key].error,
         "layer_errors": per_policy[key].layer_errors, "kept_tokens": per_policy[key].kept_tokens}
        for key, policy in grid.items()
    ]
    for budget, size in _evicting_budgets(grid, unit["length"]).items():
        for name, results in (("oracle", oracle), ("greedy", greedy)):
            rows.append({**_oracle_fields(name, spec, budget), **common, "error": results[size].error,
                         "layer_errors": results[size].layer_errors, "kept_tokens": size})
    return rows
