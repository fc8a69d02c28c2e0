"""Paired comparison of two policy labels of one results file, score by score and budget by budget.

    python scripts/compare_labels.py runs/fidelity/results.jsonl --metric kl \\
        --a "snapkv" --b "snapkv[gqa=pre-average]"

Both labels must have run on the same samples (pairs are matched on length,
depth, seed and sample). For each score and budget: the means of A and B, the
mean difference B - A with its 95% t interval, how often B is better, and the
exact sign-test p-value (`obcache.evaluation.stats`). `obcache report`
compares scores within a label; this compares labels (GQA reductions, head
combines, selection modes) with the score held fixed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from obcache.evaluation.stats import paired
from obcache.evaluation.store import read_rows
from obcache.evaluation.tables import METRICS, Group, format_p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--metric", default="kl", choices=list(METRICS), help="a report metric (default kl)")
    parser.add_argument("--a", required=True, help="baseline policy label")
    parser.add_argument("--b", required=True, help="compared policy label")
    args = parser.parse_args()
    group, info = Group(read_rows(args.results)), METRICS[args.metric]
    print(f"{args.metric} ({info.better} is better): A = {args.a}, B = {args.b}\n")
    print("| score | budget | pairs | A | B | B - A [95% CI] | B better / worse | p |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    keys = {(r["score"], r["budget"]) for r in group.rows if r["policy"] in (args.a, args.b)}
    for score, budget in sorted(keys, key=lambda k: (str(k[0]), -k[1])):
        a, b = (group.by_sample(args.metric, label, score, budget) for label in (args.a, args.b))
        common = sorted(set(a) & set(b), key=repr)
        if len(common) < 2:
            continue
        test = paired([b[s] for s in common], [a[s] for s in common], higher_is_better=info.better == "higher",
                      proportion=info.proportion)
        mean_a = sum(a[s] for s in common) / len(common)
        mean_b = sum(b[s] for s in common) / len(common)
        low, high = test.difference.low, test.difference.high
        print(f"| {score} | {budget:g} | {len(common)} | {mean_a:.4f} | {mean_b:.4f} | {mean_b - mean_a:+.4f} "
              f"[{low:+.4f}, {high:+.4f}] | {test.wins}/{test.losses} | {format_p(test.p)} |")


if __name__ == "__main__":
    main()
