"""Needle accuracy counted over the samples the full cache answers correctly, with 95% intervals and paired tests.

    python scripts/needle_summary.py runs/niah-aware/results.jsonl [--policies LABEL,...] [--budgets 0.5,0.2,...]
        [--plot out.png]

For each policy label x score and each budget: accuracy among the samples
whose full-cache answer is correct (Wilson 95% interval), and for each
OBCache score the exact McNemar test against `attention` of the same policy
label and budget on those samples. This is the issue's goal measure ("counted
over the samples that the full cache gets right"); `obcache report` counts
every sample.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

from obcache.evaluation.stats import paired, wilson
from obcache.evaluation.store import read_rows
from obcache.evaluation.tables import sample_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--policies", type=lambda t: re.split(r",(?![^\[]*\])", t), default=None,
                        help="policy labels to show, comma-separated (commas inside [...] belong to a label)")
    parser.add_argument("--budgets", type=lambda t: [float(b) for b in t.split(",")], default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG: accuracy vs fraction removed, a panel per policy")
    args = parser.parse_args()
    rows = read_rows(args.results)
    good = {sample_key(r) for r in rows if r["policy"] == "full" and r["correct"] == 1.0}
    total = {sample_key(r) for r in rows if r["policy"] == "full"}
    print(f"{len(good)} of {len(total)} samples answered correctly with the full cache\n")
    cells: dict[tuple, dict] = collections.defaultdict(dict)
    for row in rows:
        if row["policy"] != "full" and sample_key(row) in good:
            cells[(row["policy"], row["score"], row["budget"])][sample_key(row)] = row["correct"]
    budgets = args.budgets or sorted({key[2] for key in cells}, reverse=True)
    labels = [label for label in dict.fromkeys(key[0] for key in cells) if not args.policies or label in args.policies]
    print("| policy | score | " + " | ".join(f"{b:g} kept ({1 - b:.0%} removed)" for b in budgets) + " |")
    print("|---|---|" + "---:|" * len(budgets))
    for label in labels:
        for score in dict.fromkeys(key[1] for key in cells if key[0] == label):
            out = []
            for budget in budgets:
                values = cells.get((label, score, budget), {})
                if not values:
                    out.append("")
                    continue
                hits = sum(value == 1.0 for value in values.values())
                low, high = wilson(hits, len(values))
                text = f"{hits}/{len(values)} [{low:.0%}, {high:.0%}]"
                base = cells.get((label, "attention", budget), {})
                common = sorted(set(values) & set(base))
                if score not in ("attention", None) and common:
                    test = paired([values[s] for s in common], [base[s] for s in common], proportion=True)
                    mark = "**" if test.p < 0.05 else ""
                    p_text = "p<0.001" if test.p < 0.001 else f"p={test.p:.3f}"
                    text += f" {mark}{p_text}{mark}"
                out.append(text)
            print(f"| {label} | {score or '-'} | " + " | ".join(out) + " |")
    if args.plot:
        plot(cells, labels, budgets, args.plot, title=f"{args.results.parent.name}: accuracy over the {len(good)} "
             "samples the full cache answers correctly (95% Wilson bands)")


def plot(cells: dict, labels: list[str], budgets: list[float], path: Path, title: str) -> None:
    """Accuracy vs % removed, one panel per policy label, a line per score with its Wilson band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"attention": "k", "obc-value": "tab:blue", "obc-key": "tab:orange", "obc-joint": "tab:green", None: "gray"}
    fig, axes = plt.subplots(1, len(labels), figsize=(3.3 * len(labels), 3.2), squeeze=False, sharey=True)
    removed = [100 * (1 - b) for b in budgets]
    for ax, label in zip(axes[0], labels):
        for score in dict.fromkeys(key[1] for key in cells if key[0] == label):
            values = [cells.get((label, score, b), {}) for b in budgets]
            hits = [sum(v == 1.0 for v in column.values()) for column in values]
            sizes = [len(column) for column in values]
            bands = [wilson(h, n) if n else (float("nan"),) * 2 for h, n in zip(hits, sizes)]
            ax.plot(removed, [100 * h / n if n else float("nan") for h, n in zip(hits, sizes)], marker="o", ms=3,
                    color=colors.get(score, "tab:purple"), label=score or "sinks + recent")
            ax.fill_between(removed, [100 * b[0] for b in bands], [100 * b[1] for b in bands],
                            color=colors.get(score, "tab:purple"), alpha=0.08)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("% of the prompt removed")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("needle retrieved (%)")
    handles = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
