"""The markdown of `obcache report`: metric tables with 95% intervals, paired comparisons, a summary per group.

A cell is `mean [low, high] n=N` over the samples (Wilson interval for a
proportion metric, accuracy, when every value is 0 or 1; Student t otherwise;
see stats.py), clipped to the metric's range. Paired comparisons put each non-attention score of a policy label
against `attention` of the same label and budget, on the samples both have
(a sample is its (length, depth, seed, sample)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from statistics import mean
from typing import NamedTuple

from obcache.evaluation.spec import FULL
from obcache.evaluation.stats import Estimate, Paired, estimate, holm, paired

SIGNIFICANCE = 0.05
BASELINE = "attention"
REFERENCES = ("oracle", "greedy")  # oracle-task kept sets: shown in tables, never compared or ranked


def prefix_match(row: dict) -> float:
    """Mean over expected values e of the longest prefix of e found in the prediction, over len(e).

    Partial credit for digit-per-token tokenizers: '5304' for '5304908' scores 4/7.
    """
    text = row["prediction"].lower()
    return mean(max((n for n in range(len(e) + 1) if e.lower()[:n] in text), default=0) / len(e) for e in row["expected"])


class Metric(NamedTuple):
    value: Callable[[dict], float | None]  # of a row (None: the row does not record it)
    scale: float  # shown value = value * scale
    fmt: str
    label: str
    better: str  # "higher" | "lower": the direction that counts as a win
    bounds: tuple[float, float]  # range of a row's value: intervals are clipped to it
    proportion: bool = False  # rows are 0/1 outcomes where every value is 0 or 1 (Wilson interval, McNemar)
    compared: bool = True  # paired against attention and ranked in the summary (not a description of the cache)


def held_fraction(row: dict) -> float | None:
    """Bytes the evicted cache holds, float elements counted at 16 bits, over the prompt's full cache at 16 bits
    (None for rows written before they were recorded)."""
    if row.get("cache_bytes_16") is None or not row.get("full_bytes_16"):
        return None
    return row["cache_bytes_16"] / row["full_bytes_16"]


METRICS = {
    "accuracy": Metric(lambda r: r["correct"], 100.0, "{:.0f}", "accuracy (%)", "higher", (0, 1), True),
    # None for needle rows written before it was recorded: left out of every cell and comparison
    "exact": Metric(lambda r: r.get("exact"), 100.0, "{:.0f}", "exact match (%)", "higher", (0, 1), True),
    "prefix": Metric(prefix_match, 100.0, "{:.0f}", "answer prefix recovered (%)", "higher", (0, 1)),
    "perplexity": Metric(lambda r: r["perplexity"], 1.0, "{:.2f}", "perplexity", "lower", (1, math.inf)),
    "kl": Metric(lambda r: r["kl"], 1.0, "{:.3f}", "KL(full || evicted), nats/token", "lower", (0, math.inf)),
    "top1": Metric(lambda r: r["top1"], 100.0, "{:.1f}", "top-1 agreement (%)", "higher", (0, 1)),
    "error": Metric(lambda r: r["error"], 1.0, "{:.3f}", "relative output error", "lower", (0, math.inf)),
    "layer_error": Metric(lambda r: mean(r["layer_errors"]), 1.0, "{:.3f}", "attention-output error, mean over layers",
                          "lower", (0, math.inf)),
    # needle rows: prefill + choice (KVzip: + its reconstruction) over the plain prefill, as timed inside the eval
    "bytes": Metric(held_fraction, 100.0, "{:.2f}", "bytes held (% of the prompt's full 16-bit cache)", "lower",
                    (0, math.inf), compared=False),
    "cost": Metric(lambda r: (r["prefill_seconds"] + r["select_seconds"]) / r["prefill_seconds"], 1.0, "{:.2f}",
                   "compression cost (x the plain prefill)", "lower", (1, math.inf)),
}


def budget_label(budget) -> str:
    return f"{budget:g}" if isinstance(budget, float) else f"{budget} tok"


def sample_key(row: dict) -> tuple:
    return row["length"], row["depth"], row["seed"], row["sample"]


def format_estimate(metric: str, e: Estimate, *, signed: bool = False, n: bool = True) -> str:
    """'82 [64, 92] n=24' ('82 n=1' without an interval); signed: '+12 [+2, +22]'."""
    fmt = METRICS[metric].fmt.replace("{:", "{:+") if signed else METRICS[metric].fmt
    text = fmt.format(e.mean) + ("" if math.isnan(e.low) else f" [{fmt.format(e.low)}, {fmt.format(e.high)}]")
    return text + (f" n={e.n}" if n else "")


def format_p(p: float) -> str:
    text = "<0.001" if p < 0.001 else f"{p:.3f}"
    return f"**{text}**" if p < SIGNIFICANCE else text


def _name(policy: str, score) -> str:
    return policy if score in (None, policy) else f"{policy} + {score}"


class Group:
    """The rows of one (task, mode, model, settings): per (policy, score, budget) estimates and comparisons."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
        self.policies = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] not in (FULL, *REFERENCES)))
        self.scores = {p: sorted(dict.fromkeys(r["score"] for r in rows if r["policy"] == p), key=lambda s: s != BASELINE)
                       for p in self.policies}  # attention first, then the order of the file
        self.references = [p for p in REFERENCES if any(r["policy"] == p for r in rows)]
        self._index: dict[tuple, list[dict]] = {}  # (policy, score, budget; None for the full cache) -> rows
        for r in rows:
            self._index.setdefault((r["policy"], r["score"], None if r["policy"] == FULL else r["budget"]), []).append(r)
        self._comparisons: dict[str, list] = {}

    def by_sample(self, metric: str, policy: str, score, budget=None) -> dict[tuple, float]:
        """Sample -> value (unscaled; the mean where a sample has several rows)."""
        found: dict[tuple, list[float]] = {}
        for r in self._index.get((policy, score, None if policy == FULL else budget), []):
            if (value := METRICS[metric].value(r)) is not None:
                found.setdefault(sample_key(r), []).append(value)
        return {key: mean(values) for key, values in found.items()}

    def values(self, metric: str, policy: str, score, budget=None) -> list[float]:
        scale = METRICS[metric].scale
        return [value * scale for value in self.by_sample(metric, policy, score, budget).values()]

    def mean(self, metric: str, policy: str, score, budget=None) -> float | None:
        values = self.values(metric, policy, score, budget)
        return mean(values) if values else None

    def estimate(self, metric: str, policy: str, score, budget=None) -> Estimate | None:
        """Mean and 95% interval over samples, scaled and clipped to the metric's range (None: no rows)."""
        values = list(self.by_sample(metric, policy, score, budget).values())
        if not values:
            return None
        info = METRICS[metric]
        return _scaled(estimate(values, proportion=info.proportion), info.scale, info.bounds)

    def cell(self, metric: str, policy: str, score, budget=None) -> str:
        e = self.estimate(metric, policy, score, budget)
        return "" if e is None else format_estimate(metric, e)

    def _header(self) -> list[str]:
        return ["| policy | score | " + " | ".join(budget_label(b) for b in self.budgets) + " |",
                "|---|---|" + "---:|" * len(self.budgets)]

    def table(self, metric: str) -> str:
        lines = self._header()
        full = self.cell(metric, FULL, None)
        if full:
            lines.append(f"| full cache | | {full} |" + " |" * (len(self.budgets) - 1))
        for policy in self.policies + self.references:
            for score in self.scores.get(policy, [policy]):
                cells = [self.cell(metric, policy, score, budget) for budget in self.budgets]
                lines.append(f"| {policy} | {score or '-'} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def gap_table(self) -> str:
        """Fraction of the attention-to-oracle error gap each non-attention score closes (oracle task)."""
        lines = self._header()
        for policy in self.policies:
            for score in self.scores[policy]:
                if score in (BASELINE, None):
                    continue
                cells = []
                for budget in self.budgets:
                    base, value = self.mean("error", policy, BASELINE, budget), self.mean("error", policy, score, budget)
                    oracle = self.mean("error", "oracle", "oracle", budget)
                    gap = None if None in (base, value, oracle) or base - oracle <= 0 else (base - value) / (base - oracle)
                    cells.append("" if gap is None else f"{gap:+.0%}")
                lines.append(f"| {policy} | {score} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def comparisons(self, metric: str) -> list[tuple[str, str, float | int, Paired]]:
        """(policy, score, budget, score vs attention) on the shared samples, for every non-attention score."""
        if metric in self._comparisons:
            return self._comparisons[metric]
        found, info = [], METRICS[metric]
        if not info.compared:
            return found
        for policy in self.policies:
            if BASELINE not in self.scores[policy]:
                continue
            for score in self.scores[policy]:
                if score in (BASELINE, None):
                    continue
                for budget in self.budgets:
                    mine, base = self.by_sample(metric, policy, score, budget), self.by_sample(metric, policy, BASELINE, budget)
                    shared = sorted(set(mine) & set(base), key=repr)
                    if shared:
                        result = paired([mine[k] for k in shared], [base[k] for k in shared],
                                        higher_is_better=info.better == "higher", proportion=info.proportion)
                        found.append((policy, score, budget, replace(result, difference=_scaled(result.difference,
                                                                                                 info.scale))))
        self._comparisons[metric] = found
        return found

    def paired_table(self, metric: str) -> str:
        lines = ["| policy | score | budget | pairs | difference [95% CI] | wins/ties/losses | p | favours |",
                 "|---|---|---|---:|---:|---:|---:|---|"]
        for policy, score, budget, c in self.comparisons(metric):
            favours = "" if c.p >= SIGNIFICANCE else f"**{score if c.wins > c.losses else BASELINE}**"
            lines.append(f"| {policy} | {score} | {budget_label(budget)} | {c.n} | "
                         f"{format_estimate(metric, c.difference, signed=True, n=False)} | "
                         f"{c.wins}/{c.ties}/{c.losses} | {format_p(c.p)} | {favours} |")
        return "\n".join(lines)

    def best(self, metric: str, budget) -> tuple[str, Estimate, int] | None:
        """The best (policy, score) at a budget by mean in the metric's direction, its estimate, how many tie it."""
        sign = 1 if METRICS[metric].better == "higher" else -1
        found = [(_name(p, s), e) for p in self.policies for s in self.scores[p]
                 if (e := self.estimate(metric, p, s, budget)) is not None]
        if not found:
            return None
        top = max(sign * e.mean for _, e in found)
        tied = [(name, e) for name, e in found if sign * e.mean == top]
        return tied[0][0], tied[0][1], len(tied) - 1

    def summary(self, metrics) -> str:
        """One factual paragraph: the best (policy, score) per budget and metric, and the significant comparisons."""
        parts = []
        for metric in (m for m in metrics if METRICS[m].compared):
            best = []
            for budget in self.budgets:
                if (found := self.best(metric, budget)) is not None:
                    name, e, ties = found
                    best.append(f"{budget_label(budget)}: {name} {format_estimate(metric, e)}"
                                + (f" (tied with {_count(ties, 'other')})" if ties else ""))
            full = self.estimate(metric, FULL, None)
            text = f"*{METRICS[metric].label}*, {METRICS[metric].better} is better. " + (
                f"Best at budget {'; '.join(best)}" if best else "No evicting policy") + (
                f" (full cache {format_estimate(metric, full)})." if full else ".")
            comparisons = [c for *_, c in self.comparisons(metric)]
            if comparisons:
                raw, adjusted = [c.p for c in comparisons], holm([c.p for c in comparisons])
                score, base = _favouring(comparisons, raw, True), _favouring(comparisons, raw, False)
                few = sum(c.wins + c.losses < 6 for c in comparisons)
                text += (f" Paired against attention: of {_count(len(comparisons), 'comparison')}, {score} favour "
                         f"the OBCache score (or exact-removal) at p < {SIGNIFICANCE} and {base} favour attention "
                         f"({_favouring(comparisons, adjusted, True)} and {_favouring(comparisons, adjusted, False)} "
                         f"after Holm correction over the {len(comparisons)})")
                text += (f"; {_count(few, 'comparison')} {'has' if few == 1 else 'have'} fewer than 6 non-tied pairs "
                         f"and cannot reach p < {SIGNIFICANCE}." if few else ".")
            parts.append(text)
        return "**Summary.** " + " ".join(parts)


def _scaled(e: Estimate, scale: float, bounds: tuple[float, float] = (-math.inf, math.inf)) -> Estimate:
    """e in shown units: times scale, the interval clipped to bounds (in row units) first."""
    low, high = (e.low, e.high) if math.isnan(e.low) else (max(e.low, bounds[0]), min(e.high, bounds[1]))
    return Estimate(e.mean * scale, low * scale, high * scale, e.n, e.method)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _favouring(comparisons: list[Paired], pvalues: list[float], score_side: bool) -> int:
    """How many comparisons are significant with the score (score_side) or attention ahead."""
    return sum(p < SIGNIFICANCE and (c.wins > c.losses) == score_side for c, p in zip(comparisons, pvalues))
