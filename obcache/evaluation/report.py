"""`obcache report DIR`: markdown tables and PNG plots of `DIR/results.jsonl`.

Per (task, mode, model, settings) group: a generated summary paragraph, one
table per metric (policy x score rows, budget columns, cells `mean [95%
interval] n=samples`, the full cache first), the paired comparisons of every
OBCache score (and exact-removal) against `attention` (tables.py, stats.py),
and plots: metric vs budget per policy with 95% bands, needle depth x length
heatmaps, per-layer errors, perplexity over position. The oracle gap closed
by score s is (mean err_attention - mean err_s) / (mean err_attention - mean err_oracle).
"""

from __future__ import annotations

import re
from math import nan
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

from obcache.evaluation.families import family_of
from obcache.evaluation.spec import FULL
from obcache.evaluation.store import RESULTS_FILE, read_rows
from obcache.evaluation.tables import METRICS, SIGNIFICANCE, Group, budget_label, prefix_match, sample_key

__all__ = ["METRICS", "prefix_match", "write_report"]

SCORE_STYLE = {"attention": "k", "obc-value": "tab:blue", "obc-key": "tab:orange", "obc-joint": "tab:green",
               "exact-removal": "tab:purple", None: "tab:gray", "oracle": "tab:red", "greedy": "tab:pink"}


def _legend(fig, axes, *, columns: int | None = None, fontsize=None) -> int:
    """One figure legend below the panels, each label once; returns the number of entries."""
    handles: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(columns or len(handles), len(handles)),
               frameon=False, fontsize=fontsize)
    return len(handles)


def _curves(plt, group: Group, metrics: list[str], path: Path, title: str, extra=("oracle", "greedy")) -> None:
    """One row of panels per metric, one column per policy: metric vs budget, a line per score."""
    fig, axes = plt.subplots(len(metrics), len(group.policies), figsize=(3.6 * len(group.policies), 2.9 * len(metrics)),
                             squeeze=False, sharex=True)
    x = list(range(len(group.budgets)))
    for row, metric in enumerate(metrics):
        for col, policy in enumerate(group.policies):
            ax = axes[row][col]
            curves = [(policy, s) for s in group.scores[policy]] + [(e, e) for e in extra]
            for name, score in curves:
                estimates = [group.estimate(metric, name, score, b) for b in group.budgets]
                if all(e is None for e in estimates):
                    continue
                mean_, low, high = ([nan if e is None else getattr(e, f) for e in estimates] for f in ("mean", "low", "high"))
                color, dashed = SCORE_STYLE.get(score, "tab:brown"), name in ("oracle", "greedy")
                ax.plot(x, mean_, marker="o", ms=3, ls="--" if dashed else "-", color=color, label=score or "sinks + recent")
                ax.fill_between(x, low, high, color=color, alpha=0.08, lw=0)  # the 95% interval
            full = group.mean(metric, FULL, None)
            if full is not None:
                ax.axhline(full, color="gray", ls=":", lw=1.2, label="full cache")
            ax.set_xticks(x, [budget_label(b) for b in group.budgets])
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(policy)
            if col == 0:
                ax.set_ylabel(METRICS[metric].label)
            if row == len(metrics) - 1:
                ax.set_xlabel("budget (fraction kept)")
            if metric == "kl" and any(v > 0 for v in ax.get_lines()[0].get_ydata()):
                ax.set_yscale("log")
    _legend(fig, axes)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _heatmaps(plt, group: Group, metric: str, path: Path, title: str) -> str:
    """`metric` over needle depth x length, a panel per (policy, score), at the budget whose mean is closest to 50%."""
    value, scale = METRICS[metric].value, METRICS[metric].scale
    spread = {b: abs(mean(value(r) for r in group.rows if r["budget"] == b) - 0.5) for b in group.budgets}
    budget = min(spread, key=spread.get)
    depths = sorted({r["depth"] for r in group.rows}, key=lambda d: -1 if d is None else d)
    lengths = sorted({r["length"] for r in group.rows})
    panels = [(FULL, None)] + [(p, s) for p in group.policies for s in group.scores[p]]
    cols = max([len(s) for s in group.scores.values()] + [1])
    rows = 1 + len(group.policies)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 + 1.2 * cols * len(lengths), 0.5 + 0.45 * rows * (len(depths) + 1)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for policy, score in panels:
        ax = axes[0][0] if policy == FULL else axes[1 + group.policies.index(policy)][group.scores[policy].index(score)]
        ax.set_visible(True)
        grid = [[mean([value(r) * scale for r in group.rows if r["policy"] == policy and r["score"] == score
                       and r["depth"] == d and r["length"] == n and (policy == FULL or r["budget"] == budget)] or [float("nan")])
                 for n in lengths] for d in depths]
        ax.imshow(grid, vmin=0, vmax=scale, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, cell in enumerate(line):
                ax.text(j, i, f"{cell:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if cell < 0.2 * scale or cell > 0.85 * scale else "black")
        ax.set_xticks(range(len(lengths)), lengths, fontsize=7)
        ax.set_yticks(range(len(depths)), ["rand" if d is None else f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(f"{policy} {score or ''}".strip(), fontsize=8)
    fig.suptitle(f"{title}\n{METRICS[metric].label} by needle depth (rows) x length (cols), budget {budget_label(budget)}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return budget_label(budget)


def _layer_errors(plt, group: Group, path: Path, title: str) -> str:
    """Per-layer relative attention-output error at the smallest budget, a panel per policy."""
    budget = group.budgets[0]
    fig, axes = plt.subplots(1, len(group.policies), figsize=(3.6 * len(group.policies), 3.0), squeeze=False, sharey=True)
    for ax, policy in zip(axes[0], group.policies):
        for score in group.scores[policy]:
            per_row = [r["layer_errors"] for r in group.rows if r["policy"] == policy and r["score"] == score
                       and r["budget"] == budget]
            ax.plot([mean(layer) for layer in zip(*per_row)], color=SCORE_STYLE.get(score, "tab:brown"),
                    label=score or "sinks + recent")
        ax.set_title(policy)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("||o - o_full|| / ||o_full||")
    _legend(fig, axes)
    fig.suptitle(f"{title}: per-layer attention-output error at budget {budget_label(budget)}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return budget_label(budget)


def _positions(plt, group: Group, path: Path, title: str) -> None:
    """Perplexity over position (buckets of the stream), a panel per budget, a line per policy x score."""
    fig, axes = plt.subplots(1, len(group.budgets), figsize=(4.6 * len(group.budgets), 3.6), squeeze=False, sharey=True)
    styles = ["-", "--", ":", "-."]

    def curve(rows: list[dict]) -> tuple[list[float], list[float]]:
        buckets = [mean(values) for values in zip(*(r["bucket_perplexities"] for r in rows))]
        size = rows[0]["bucket"]
        return [size * (i + 0.5) for i in range(len(buckets))], buckets

    full = [r for r in group.rows if r["policy"] == FULL]
    for ax, budget in zip(axes[0], group.budgets):
        if full:
            ax.plot(*curve(full), color="gray", lw=2.2, alpha=0.6, marker="o", ms=3, label="full cache")
        for index, policy in enumerate(group.policies):
            for score in group.scores[policy]:
                rows = [r for r in group.rows if r["policy"] == policy and r["score"] == score and r["budget"] == budget]
                if rows:
                    ax.plot(*curve(rows), ls=styles[index % len(styles)], color=SCORE_STYLE.get(score, "tab:brown"),
                            marker="o", ms=2, label=f"{policy} {score or ''}".strip())
        ax.set_title(f"budget {budget_label(budget)}")
        ax.set_xlabel("position in the stream (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity (per bucket)")
    entries = _legend(fig, axes, columns=5, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * (entries // 5), 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(folder: str | Path) -> Path:
    """Write `folder/report.md` and its PNGs (next to it); return the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    rows = read_rows(folder / RESULTS_FILE)
    if not rows:
        raise ValueError(f"no results in {folder / RESULTS_FILE}")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["task"], row["mode"], row["model"], _settings_text(row.get("settings")))].append(row)
    out = [f"# obcache evaluation report: {folder}", "",
           "Budgets are the fraction of the prompt KEPT per layer and KV head; for `quantized[...]` and `mixed[...]` "
           "policies (`obcache eval --precision`) they are byte budgets, the fraction of the prompt's full cache at "
           "16 bits per element held, and 'bytes held' counts what each cache holds (float elements at 16 bits). "
           "A cell is `mean [95% interval] "
           "n=samples`: the Wilson score interval for accuracy when every value is 0 or 1 (single-value needle tasks), "
           "the Student t interval of the mean otherwise, clipped to the metric's range. Paired comparisons put each "
           "OBCache score (and exact-removal) against `attention` of the same policy and budget on the samples "
           "both have: mean difference (score - attention) with its paired t interval, wins/ties/losses in the "
           "metric's better direction, and the exact two-sided sign test on the non-tied pairs (for 0/1 "
           f"outcomes this is McNemar's exact test). **Bold** p: p < {SIGNIFICANCE}, not corrected for the many "
           "comparisons (the summary also counts them after Holm correction).",
           "Needle tasks: accuracy is RULER's string match of all expected values (the answer contains them); "
           "'exact match' asks that the answer's first values be exactly the expected ones (for a number needle: "
           "its first number; '53049088' contains 5304908 but does not match it); 'answer prefix recovered' "
           "gives partial credit (the longest prefix of each expected value found in the answer)."]
    several = Counter(key[:3] for key in groups)  # (task, mode, model) run under several settings
    for (task, mode, model, settings), group_rows in sorted(groups.items()):
        family, group, apart = family_of(task), Group(group_rows), several[(task, mode, model)] > 1
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{task}_{mode}_{model}" + (f"_{settings}" if apart else ""))
        versions = group_rows[0].get("versions", {})
        n = len({sample_key(r) for r in group_rows})
        out += ["", f"## {task} ({mode}), {model}" + (f"; {settings}" if apart else ""), "",
                f"{n} samples; lengths {sorted({r['length'] for r in group_rows})}; settings: {settings}; "
                f"versions {', '.join(f'{k} {v}' for k, v in versions.items())}.", ""]
        description = family.describe(group_rows)
        if description:
            out += [description, ""]
        out.append(group.summary(family.metrics))
        for metric in family.metrics:
            out += ["", f"**{METRICS[metric].label}** ({METRICS[metric].better} is better)", "", group.table(metric)]
            missing = sum(METRICS[metric].value(r) is None for r in group_rows)
            if missing:
                out += ["", f"{missing} of {len(group_rows)} rows do not record the {METRICS[metric].label.removesuffix(' (%)')} "
                        "(written before it was recorded): they are left out."]
        if family.gap_table:
            out += ["", "**fraction of the attention-to-oracle error gap closed**", "", group.gap_table()]
        compared = [metric for metric in family.metrics if group.comparisons(metric)]
        if compared:
            out += ["", "### Paired comparisons against attention"]
        for metric in compared:
            out += ["", f"**{METRICS[metric].label}** ({METRICS[metric].better} is better; difference = score - "
                    "attention; wins: the score is better)", "", group.paired_table(metric)]
        blocks = family.blocks(group_rows)
        if blocks is not None and compared:
            unit, block_rows = blocks
            block_group = Group(block_rows)
            for metric in compared:
                out += ["", f"**{METRICS[metric].label}, paired per {unit}** (difference = score - attention)", "",
                        block_group.paired_table(metric)]
        png = folder / f"{slug}.png"
        _curves(plt, group, list(family.metrics), png, f"{task} ({mode}), {model}")
        out += ["", f"![{task} {mode}]({png.name})"]
        if family.position_plot:
            positions_png = folder / f"{slug}_positions.png"
            _positions(plt, group, positions_png, f"{task} over position, {model}")
            out += ["", f"![{task} over position]({positions_png.name})"]
        if family.layer_plot:
            layers_png = folder / f"{slug}_layers.png"
            _layer_errors(plt, group, layers_png, f"{task}, {model}")
            out += ["", f"![{task} per-layer errors]({layers_png.name})"]
        for metric in family.heatmaps:
            heat = folder / f"{slug}_{metric}_heatmap.png"
            budget = _heatmaps(plt, group, metric, heat, f"{task} ({mode}), {model}")
            out += ["", f"{METRICS[metric].label} by depth and length at budget {budget} (the budget whose mean "
                    "is closest to 50%):", "", f"![{task} {mode} {metric} heatmap]({heat.name})"]
    path = folder / "report.md"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _settings_text(settings: dict | None) -> str:
    """'dtype float32, attn sdpa, future 256' (rows written before settings were recorded: 'not recorded')."""
    if settings is None:
        return "not recorded"
    return ", ".join(f"{name} {'default' if value is None else value}" for name, value in settings.items())
