"""The task families of the evaluation grid, one object each, in the table FAMILIES.

- needle tasks (tasks.py, RULER-style): greedy answers scored by string match;
- `fidelity` (fidelity.py): perplexity, KL and top-1 vs the full cache, teacher-forced;
- `oracle` (oracle.py): future-query output error of each kept set vs a greedy oracle;
- `perplexity` (perplexity.py): streaming perplexity with eviction during the stream.

A family owns, for its tasks: the settings that change its numbers
(`settings`, part of every row's key), the rows one sample is expected to
produce (`expected_rows`) and how they are computed (`rows`), the row fields
it writes (`fields`, checked when a results file is read; `optional_fields`
where older rows lack them), and what the report shows of it (`metrics`,
`describe`, and the optional sections `heatmaps` (of those metrics),
`layer_plot`, `gap_table`, `position_plot`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from obcache.evaluation.tasks import TASKS, exact_match, make_sample, questions, score_prediction
from obcache.policies import Selector, policy_allocation

if TYPE_CHECKING:
    from obcache.evaluation.spec import EvalSpec

NUMBER = (int, float)
#: Field types of a row: a type, a tuple of types, or [type] for a list of that type.
FieldTypes = dict[str, "type | tuple | list"]


def policy_fields(key: tuple, policy: Selector | None) -> dict:
    """The identifying fields of a grid policy's row (key: (policy label, score, budget))."""
    label, score, budget = key
    fields = {"policy": label, "policy_repr": repr(policy) if policy is not None else "full cache", "score": score,
              "budget": budget}
    if policy is not None:
        fields.update(selection=policy.base.selection, chunk=policy.base.chunk, allocation=policy_allocation(policy))
    return fields


def byte_fields(cache, model, prompt_tokens: int) -> dict:
    """What a cache holds (`kv_nbytes`, as stored; `index_nbytes`, its slot bookkeeping), the keys and values with
    every float element counted at 16 bits (packed codes, scales and zeros as they are), and the prompt's full
    cache at 16 bits per element."""
    from obcache.layouts.mixed import MixedLayer
    from obcache.models import head_dim, layers_and_kv_heads

    at_16 = sum(layer.nbytes() if isinstance(layer, MixedLayer) else layer.nbytes() * 2 // layer.dtype.itemsize
                for layer in cache.layers)
    layers, heads = layers_and_kv_heads(model)  # this rank's heads, as the cache holds them
    full = 2 * 2 * prompt_tokens * layers * heads * head_dim(model.config)  # keys and values, 2 bytes an element
    return {"cache_bytes": cache.kv_nbytes(), "index_bytes": cache.index_nbytes(), "cache_bytes_16": at_16,
            "full_bytes_16": full}


class TaskFamily:
    """Defaults shared by the teacher-forced families (fidelity, oracle); see the module docstring."""

    tasks: dict[str, str]  # task name -> one-line description
    fields: FieldTypes
    optional_fields: FieldTypes = {}  # written by the harness now, absent from rows written before
    metrics: tuple[str, ...]  # report.METRICS names
    heatmaps: tuple[str, ...] = ()  # metrics shown over needle depth x length
    layer_plot = gap_table = position_plot = False

    def check(self, spec: EvalSpec) -> None:
        """Raise ValueError for settings this family cannot run (no model needed)."""

    def blocks(self, rows: list[dict]) -> tuple[str, list[dict]] | None:
        """For the report: the rows cut into finer units for paired comparisons, one pseudo-row per unit, and
        what a unit is; None when the samples are the units."""
        return None

    def mode(self, spec: EvalSpec) -> str:
        return "teacher-forced"

    def depths(self, spec: EvalSpec) -> tuple[float | None, ...]:
        return (None,)

    def settings(self, spec: EvalSpec) -> dict:
        """The spec's settings (beyond dtype and attention) that change this family's numbers."""
        return {"future": spec.future}

    def expected_rows(self, spec: EvalSpec, grid: dict, length: int) -> list[dict]:
        """The identifying fields of every row a sample of `length` tokens produces."""
        return [policy_fields(key, policy) for key, policy in grid.items()]

    def positions(self, spec: EvalSpec, tokenizer, length: int) -> int:
        """Positions a sample of `length` tokens needs: prompt plus continuation."""
        return length + spec.future + 1

    def check_model(self, spec: EvalSpec, model, tokenizer) -> None:
        """Raise ValueError, before any sample runs, if the model cannot run the spec."""
        window = getattr(model.config, "max_position_embeddings", None)
        for length in spec.lengths if window is not None else ():
            needed = self.positions(spec, tokenizer, length)
            if needed > window:
                raise ValueError(
                    f"length {length} needs {needed} positions (prompt + continuation), more than the model's "
                    f"window max_position_embeddings={window}"
                )

    def rows(self, spec: EvalSpec, model, tokenizer, unit: dict, missing: dict, grid: dict,
             advance: Callable[[int], object]) -> list[dict]:
        """The rows of one sample (`unit`) for the `missing` grid policies; `advance(n)` reports progress."""
        raise NotImplementedError

    def describe(self, rows: list[dict]) -> str | None:
        """A sentence for the report about what the rows measure."""
        return None


def _prompt(sample, tokenizer) -> tuple[list[int], list[int]]:
    from obcache.generation import build_prompt

    return build_prompt(tokenizer, sample.context, sample.question, answer_prefix=sample.answer_prefix)


def _document(spec: EvalSpec, tokenizer, unit: dict) -> list[int]:
    from obcache.text import document_ids

    return document_ids(tokenizer, unit["length"] + spec.future + 1, seed=spec.seed + unit["sample"])


class NeedleFamily(TaskFamily):
    """RULER-style tasks: one prefill per sample, then each policy's greedy answer."""

    tasks = TASKS
    fields = {"prediction": str, "expected": [str], "correct": NUMBER}
    optional_fields = {"exact": NUMBER, "cache_bytes_16": int, "full_bytes_16": int}
    metrics = ("accuracy", "exact", "prefix", "bytes")
    heatmaps = ("accuracy", "prefix")

    def check(self, spec: EvalSpec) -> None:
        if spec.query_aware and spec.task == "niah_multiquestion":
            raise ValueError("niah_multiquestion is query-agnostic: its questions share one compressed cache "
                             "(drop --query-aware)")

    def mode(self, spec: EvalSpec) -> str:
        return "query-aware" if spec.query_aware else "query-agnostic"

    def depths(self, spec: EvalSpec) -> tuple[float | None, ...]:
        return spec.depths

    def settings(self, spec: EvalSpec) -> dict:
        return {"max_new_tokens": spec.max_new_tokens}

    def positions(self, spec: EvalSpec, tokenizer, length: int) -> int:
        sample = make_sample(spec.task, tokenizer, length, seed=spec.seed, depth=spec.depths[0])
        return sum(map(len, _prompt(sample, tokenizer))) + self._max_new_tokens(spec, sample, tokenizer)

    @staticmethod
    def _max_new_tokens(spec: EvalSpec, sample, tokenizer) -> int:
        if spec.max_new_tokens is not None:
            return spec.max_new_tokens
        return len(tokenizer.encode(" " + ", ".join(sample.expected), add_special_tokens=False)) + 8

    def rows(self, spec: EvalSpec, model, tokenizer, unit: dict, missing: dict, grid: dict,
             advance: Callable[[int], object]) -> list[dict]:
        from obcache.fanout import shared_prefill
        from obcache.generation import build_prompt, continue_greedy, eos_token_ids
        from obcache.hooks import attach

        sample = make_sample(spec.task, tokenizer, unit["length"], seed=spec.seed + unit["sample"], depth=unit["depth"])
        context_ids, question_ids = _prompt(sample, tokenizer)
        prefill_ids = context_ids + question_ids if spec.query_aware else context_ids
        rest_ids = [] if spec.query_aware else question_ids
        shared = shared_prefill(model, prefill_ids, missing, tokenizer=tokenizer)
        eos, max_new = eos_token_ids(model, tokenizer), self._max_new_tokens(spec, sample, tokenizer)
        asked = questions(sample)  # several (niah_multiquestion): each on its own fork of one compressed cache
        rests = [rest_ids] + [build_prompt(tokenizer, sample.context, q.question, answer_prefix=q.answer_prefix)[1]
                              for q in asked[1:]]
        rows = []
        for key, policy in missing.items():
            compressed = shared.evicted(key)
            kept, held = compressed.kept_tokens()[0], byte_fields(compressed, model, len(prefill_ids))
            start = time.perf_counter()
            predictions = []
            with attach(model):
                for rest in rests:
                    tokens = continue_greedy(model, compressed.fork(), shared.logits, rest, eos=eos, max_new_tokens=max_new)
                    predictions.append(tokenizer.decode(tokens, skip_special_tokens=True))
            decode_seconds = time.perf_counter() - start
            rows.append({
                **policy_fields(key, policy),
                "prompt_tokens": len(prefill_ids), "question_tokens": len(question_ids),
                "prediction": " | ".join(predictions), "expected": [v for q in asked for v in q.expected],
                "correct": sum(map(score_prediction, asked, predictions)) / len(asked),
                "exact": sum(exact_match(spec.task, q.expected, p) for q, p in zip(asked, predictions)) / len(asked),
                "kept_tokens": kept, **held, "cache_bytes_full": shared.cache.kv_nbytes(),
                "prefill_seconds": shared.prefill_seconds, "select_seconds": shared.select_seconds[key],
                "decode_seconds": decode_seconds,
            })
            advance(1)
        return rows


class FidelityFamily(TaskFamily):
    """`fidelity`: teacher-forced next tokens of a document after each policy's eviction."""

    tasks = {"fidelity": "Perplexity, KL and top-1 agreement vs the full cache on the next tokens of a document."}
    fields = {"perplexity": NUMBER, "kl": NUMBER, "top1": NUMBER, "layer_errors": [NUMBER], "future": int}
    optional_fields = {"cache_bytes_16": int, "full_bytes_16": int}
    metrics = ("perplexity", "kl", "top1", "layer_error", "bytes")
    layer_plot = True

    def rows(self, spec: EvalSpec, model, tokenizer, unit: dict, missing: dict, grid: dict,
             advance: Callable[[int], object]) -> list[dict]:
        from obcache.evaluation.fidelity import evaluate_fidelity

        results = evaluate_fidelity(model, _document(spec, tokenizer, unit), unit["length"], missing, tokenizer=tokenizer,
                                    measure=lambda cache: byte_fields(cache, model, unit["length"]))
        return [
            {**policy_fields(key, missing[key]), "future": spec.future, "perplexity": r.perplexity, "kl": r.kl,
             "top1": r.top1, "layer_errors": r.layer_errors, "kept_tokens": r.kept_tokens, **r.held,
             "forward_seconds": r.seconds}
            for key, r in results.items()
        ]

    def describe(self, rows: list[dict]) -> str:
        return f"Teacher forcing on the next {rows[0]['future']} tokens of the document."


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Four layers spread over the model: 1, L/3, 2L/3, L-1 (deduplicated)."""
    return tuple(sorted({min(1, num_layers - 1), num_layers // 3, 2 * num_layers // 3, num_layers - 1}))


def _evicting_budgets(grid: dict, length: int) -> dict[float | int, int]:
    """budget -> tokens kept, for the budgets that evict something from a `length`-token prompt."""
    sizes = {policy.budget: policy.kept_tokens(length) for policy in grid.values() if policy is not None}
    return {budget: size for budget, size in sizes.items() if size < length}


class OracleFamily(TaskFamily):
    """`oracle`: every policy's kept set, plus the oracle's and the greedy set's per evicting budget."""

    tasks = {"oracle": "Future-query output error of each score's kept set vs a greedy oracle (captured layers)."}
    fields = {"error": NUMBER, "layer_errors": [NUMBER], "layers": [int], "future": int}
    metrics = ("error",)
    gap_table = True

    def settings(self, spec: EvalSpec) -> dict:
        layers = None if spec.layers is None else list(spec.layers)
        return {"future": spec.future, "layers": layers, "oracle_step": spec.oracle_step}

    def expected_rows(self, spec: EvalSpec, grid: dict, length: int) -> list[dict]:
        rows = super().expected_rows(spec, grid, length)
        for budget in _evicting_budgets(grid, length):
            rows += [self._fields("oracle", spec, budget), self._fields("greedy", spec, budget)]
        return rows

    @staticmethod
    def _fields(name: str, spec: EvalSpec, budget: float | int) -> dict:
        return {"policy": name, "policy_repr": f"{name}(step={spec.oracle_step})", "score": name, "budget": budget}

    def check_model(self, spec: EvalSpec, model, tokenizer) -> None:
        super().check_model(spec, model, tokenizer)
        count = model.config.num_hidden_layers
        if spec.layers is not None and max(spec.layers) >= count:
            raise ValueError(f"layers must lie in [0, {count - 1}] (the model has {count}), got {list(spec.layers)}")

    def rows(self, spec: EvalSpec, model, tokenizer, unit: dict, missing: dict, grid: dict,
             advance: Callable[[int], object]) -> list[dict]:
        """Every policy's row, even when resuming: the oracle is compared with every score's set."""
        from obcache.evaluation.oracle import evaluate_oracle

        layers = list(spec.layers or default_layers(model.config.num_hidden_layers))
        ids = _document(spec, tokenizer, unit)[:-1]
        per_policy, oracle, greedy = evaluate_oracle(model, ids, unit["length"], grid, layers, step=spec.oracle_step)
        common = {"layers": layers, "future": spec.future}
        rows = [
            {**policy_fields(key, policy), **common, "error": per_policy[key].error,
             "layer_errors": per_policy[key].layer_errors, "kept_tokens": per_policy[key].kept_tokens}
            for key, policy in grid.items()
        ]
        for budget, size in _evicting_budgets(grid, unit["length"]).items():
            for name, results in (("oracle", oracle), ("greedy", greedy)):
                rows.append({**self._fields(name, spec, budget), **common, "error": results[size].error,
                             "layer_errors": results[size].layer_errors, "kept_tokens": size})
        return rows

    def describe(self, rows: list[dict]) -> str:
        return (f"Relative attention-output error of the next {rows[0]['future']} queries over the prompt keys, "
                f"mean over layers {rows[0]['layers']}.")


class PerplexityFamily(TaskFamily):
    """`perplexity`: a long text streamed in chunks, each policy evicting back to its budget during the stream."""

    tasks = {"perplexity": "Streaming perplexity of a long text fed in chunks; after each chunk the cache is "
             "evicted back to the budget (tokens per KV head)."}
    fields = {"perplexity": NUMBER, "bucket_perplexities": [NUMBER], "bucket": int, "stream_chunk": int}
    metrics = ("perplexity",)
    position_plot = True
    bucket = 512  # tokens per point of the perplexity-over-position curve

    def mode(self, spec: EvalSpec) -> str:
        return "streaming"

    def settings(self, spec: EvalSpec) -> dict:
        return {"stream_chunk": spec.stream_chunk}

    def check(self, spec: EvalSpec) -> None:
        floats = [budget for budget in spec.budgets if isinstance(budget, float)]
        if floats:
            raise ValueError(f"perplexity budgets are token counts (ints like 256), got {floats}")

    def positions(self, spec: EvalSpec, tokenizer, length: int) -> int:
        return length

    def rows(self, spec: EvalSpec, model, tokenizer, unit: dict, missing: dict, grid: dict,
             advance: Callable[[int], object]) -> list[dict]:
        from obcache.evaluation.perplexity import stream
        from obcache.text import document_ids
        from obcache.policies import Decoding

        ids = document_ids(tokenizer, unit["length"], seed=spec.seed + unit["sample"])
        rows = []
        for key, policy in missing.items():
            bounded = None if policy is None else Decoding(policy, capacity=policy.budget, interval=spec.stream_chunk)
            result = stream(model, ids, bounded, chunk=spec.stream_chunk)
            rows.append({
                **policy_fields(key, policy), "perplexity": result.perplexity,
                "bucket_perplexities": result.bucket_perplexities(self.bucket), "bucket": self.bucket,
                "stream_chunk": spec.stream_chunk, "kept_tokens": result.kept_tokens,
                "cache_bytes": result.cache_bytes, "forward_seconds": result.seconds,
            })
            advance(1)
        return rows

    def blocks(self, rows: list[dict]) -> tuple[str, list[dict]]:
        """Every `bucket`-token stretch of every text, its perplexity as the row's."""
        units = [{**row, "sample": f"{row['sample']}/{index}", "perplexity": value}
                 for row in rows for index, value in enumerate(row["bucket_perplexities"])]
        return (f"{rows[0]['bucket']}-token stretch of each text (neighbouring stretches of one text are not "
                "independent: these intervals are narrower than over texts)"), units

    def describe(self, rows: list[dict]) -> str:
        return (f"The text is fed {rows[0]['stream_chunk']} tokens at a time; after each chunk every KV head is "
                "evicted back to the budget (`obcache.Decoding`). Perplexity over all tokens after the first.")


FAMILIES: tuple[TaskFamily, ...] = (NeedleFamily(), FidelityFamily(), OracleFamily(), PerplexityFamily())
ALL_TASKS: dict[str, str] = {name: text for family in FAMILIES for name, text in family.tasks.items()}


def family_of(task: str) -> TaskFamily:
    """The family of a task name (ValueError for an unknown one)."""
    for family in FAMILIES:
        if task in family.tasks:
            return family
    raise ValueError(f"unknown task {task!r}; available: {', '.join(ALL_TASKS)}")
