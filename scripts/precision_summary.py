"""Eviction and precision together at equal bytes: one table per metric, paired against eviction alone.

    python scripts/precision_summary.py runs/precision-aware/results.jsonl --metric accuracy --over-full-correct \\
        --baseline "adakv(snapkv[sinks=4,kernel=15]+chunk8):obc-key" [--plot out.png]
    python scripts/precision_summary.py runs/precision-fidelity/results.jsonl --metric kl --baseline ...

Rows of `obcache eval --precision ...`: each configuration (policy label x score) at each byte budget (the
fraction of the prompt's full cache at 16 bits per element). A cell: the metric's mean [95% interval] over the
samples (Wilson for 0/1 outcomes, t otherwise; with --over-full-correct, needle accuracy counted over the
samples the full cache answers, as hits/n), the bytes held (`cache_bytes_16` / `full_bytes_16`, mean, %), then
`e` the exact paired p against the baseline configuration at the same byte budget (McNemar for 0/1 outcomes,
the sign test otherwise) and `a` against `attention` of the same label (the pricing: OBCache vs attention).
Bold: p < 0.05; an arrow after it says which side it favours (+: this row, -: the other).
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from obcache.evaluation.stats import estimate, paired, wilson
from obcache.evaluation.store import read_rows
from obcache.evaluation.tables import METRICS, held_fraction, sample_key


def configuration(text: str) -> tuple[str, str | None]:
    label, _, score = text.rpartition(":")
    return label, score or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--metric", default="accuracy", choices=[m for m in METRICS if METRICS[m].compared])
    parser.add_argument("--baseline", type=configuration, required=True, help="LABEL:SCORE, e.g. eviction alone")
    parser.add_argument("--over-full-correct", action="store_true",
                        help="needle accuracy over the samples the full cache answers (hits/n)")
    parser.add_argument("--policies", type=lambda t: re.split(r",(?![^\[]*\])", t), default=None,
                        help="policy labels to show, in this order (commas inside [...] belong to a label)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG: the metric vs bytes held, a line per row")
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    info = METRICS[args.metric]
    rows = read_rows(args.results)
    samples = {sample_key(r) for r in rows if r["policy"] == "full"}
    if args.over_full_correct:
        samples = {sample_key(r) for r in rows if r["policy"] == "full" and r["correct"] == 1.0}
    values: dict[tuple, dict] = collections.defaultdict(dict)  # (label, score, budget) -> sample -> value
    held: dict[tuple, list[float]] = collections.defaultdict(list)
    for row in rows:
        if row["policy"] != "full" and sample_key(row) in samples and (value := info.value(row)) is not None:
            values[(row["policy"], row["score"], row["budget"])][sample_key(row)] = value
            if (fraction := held_fraction(row)) is not None:
                held[(row["policy"], row["score"], row["budget"])].append(fraction)
    budgets = sorted({key[2] for key in values}, reverse=True)
    labels = args.policies or list(dict.fromkeys(key[0] for key in values))
    full = [info.value(r) for r in rows if r["policy"] == "full" and sample_key(r) in samples]
    print(f"{args.metric} ({info.better} is better) over {len(samples)} samples"
          + (" (those the full cache answers)" if args.over_full_correct else "")
          + (f"; full cache {sum(full) / len(full) * info.scale:{info.fmt[2:-1]}}" if full else "") + "\n")
    print("| configuration | score | " + " | ".join(f"{b:g} of the 16-bit bytes" for b in budgets) + " |")
    print("|---|---|" + "---:|" * len(budgets))
    lines = []
    for label in labels:
        for score in dict.fromkeys(key[1] for key in values if key[0] == label):
            cells = []
            for budget in budgets:
                mine = values.get((label, score, budget), {})
                if not mine:
                    cells.append("")
                    continue
                cells.append(cell(args, info, mine, held[(label, score, budget)], values, label, score, budget))
            lines.append((label, score))
            print(f"| {label} | {score or '-'} | " + " | ".join(cells) + " |")
    if args.plot:
        plot(args, info, values, held, lines, budgets, full)


def cell(args, info, mine: dict, fractions: list[float], values: dict, label: str, score, budget) -> str:
    if args.over_full_correct:
        hits = sum(v == 1.0 for v in mine.values())
        low, high = wilson(hits, len(mine))
        text = f"{hits}/{len(mine)} [{low:.0%}, {high:.0%}]"
    else:
        e = estimate(list(mine.values()), proportion=info.proportion)
        fmt = info.fmt
        text = fmt.format(e.mean * info.scale) + f" [{fmt.format(e.low * info.scale)}, {fmt.format(e.high * info.scale)}]"
    if fractions:
        text += f", {100 * sum(fractions) / len(fractions):.2f}% bytes"
    tests = []
    for mark, other in (("e", (*args.baseline, budget)), ("a", (label, "attention", budget))):
        if other == (label, score, budget) or other not in values:
            continue
        theirs = values[other]
        common = sorted(set(mine) & set(theirs), key=repr)
        if not common:
            continue
        test = paired([mine[s] for s in common], [theirs[s] for s in common], higher_is_better=info.better == "higher",
                      proportion=info.proportion)
        p = "<0.001" if test.p < 0.001 else f"{test.p:.3f}"
        side = "" if test.p >= 0.05 else (" +" if test.wins > test.losses else " -")
        tests.append(f"{mark} {'**' + p + '**' if test.p < 0.05 else p}{side}")
    return text + (" (" + ", ".join(tests) + ")" if tests else "")


def plot(args, info, values: dict, held: dict, lines: list, budgets: list, full: list) -> None:
    """The metric vs the mean bytes held (% of the full 16-bit cache), a line per configuration, 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"attention": "k", "obc-value": "tab:blue", "obc-key": "tab:orange", "obc-joint": "tab:green"}
    markers = ["o", "s", "^", "v", "D", "P", "X", "*"]
    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    for index, (label, score) in enumerate(lines):
        xs, ys, lows, highs = [], [], [], []
        for budget in sorted(budgets):
            mine, fractions = values.get((label, score, budget)), held.get((label, score, budget))
            if not mine or not fractions:
                continue
            e = estimate(list(mine.values()), proportion=info.proportion)
            xs.append(100 * sum(fractions) / len(fractions))
            ys.append(e.mean * info.scale)
            lows.append(e.low * info.scale)
            highs.append(e.high * info.scale)
        mixed = label.startswith("mixed")
        color = styles.get(score, "tab:gray") if mixed else f"C{index % 10}"
        short = label.split("(", 1)[0] if label.startswith(("quantized", "mixed")) else label  # the wrapped policy apart
        name = f"{short} {score or ''}".strip()
        ax.plot(xs, ys, marker=markers[index % len(markers)], ls="-" if mixed else "--", color=color, label=name, ms=4)
        ax.fill_between(xs, lows, highs, color=color, alpha=0.07, lw=0)
    if full:
        ax.axhline(sum(full) / len(full) * info.scale, color="gray", ls=":", label="full cache")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([100 * b for b in budgets], [f"{100 * b:g}%" for b in budgets])
    ax.set_xlabel("bytes held (% of the prompt's full cache at 16 bits; measured nbytes, mean)")
    ax.set_ylabel(info.label + (" over the full cache's correct samples" if args.over_full_correct else ""))
    if args.metric == "kl":
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(args.title or args.results.parent.name, fontsize=9)
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
