"""`obcache report DIR`: markdown tables and PNG plots of `DIR/results.jsonl`.

Every table is score x policy x budget of a metric averaged over samples, with
the full-cache row first and, after each OBCache score's value, its
difference to the `attention` score of the same policy and budget. Plots:
accuracy vs budget per policy, needle depth x length heatmaps, perplexity /
KL / top-1 vs budget, oracle error curves. The oracle gap closed by score s
is (mean err_attention - mean err_s) / (mean err_attention - mean err_oracle).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

from obcache.evaluation.families import family_of
from obcache.evaluation.spec import FULL
from obcache.evaluation.store import RESULTS_FILE, read_rows

def prefix_match(row: dict) -> float:
    """Mean over expected values e of the longest prefix of e found in the prediction, over len(e).

    Partial credit for digit-per-token tokenizers: '5304' for '5304908' scores 4/7.
    """
    text = row["prediction"].lower()
    return mean(max((n for n in range(len(e) + 1) if e.lower()[:n] in text), default=0) / len(e) for e in row["expected"])


METRICS = {  # name -> (value of a row, scale, format, label)
    "accuracy": (lambda r: r["correct"], 100.0, "{:.0f}", "accuracy (%)"),
    "prefix": (prefix_match, 100.0, "{:.0f}", "answer prefix recovered (%)"),
    "perplexity": (lambda r: r["perplexity"], 1.0, "{:.2f}", "perplexity"),
    "kl": (lambda r: r["kl"], 1.0, "{:.3f}", "KL(full || evicted), nats/token"),
    "top1": (lambda r: r["top1"], 100.0, "{:.1f}", "top-1 agreement (%)"),
    "error": (lambda r: r["error"], 1.0, "{:.3f}", "relative output error"),
    "layer_error": (lambda r: mean(r["layer_errors"]), 1.0, "{:.3f}", "attention-output error, mean over layers"),
}
SCORE_STYLE = {"attention": "k", "obc-value": "tab:blue", "obc-key": "tab:orange", "obc-joint": "tab:green",
               "exact-removal": "tab:purple", None: "tab:gray", "oracle": "tab:red", "greedy": "tab:pink"}


def _budget_label(budget) -> str:
    return f"{budget:g}" if isinstance(budget, float) else f"{budget} tok"


class _Group:
    """The rows of one (task, mode, model): means of a metric per (policy, score, budget)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
        self.policies = list(dict.fromkeys(r["policy"] for r in rows if r["policy"] not in (FULL, "oracle", "greedy")))
        self.scores = {p: list(dict.fromkeys(r["score"] for r in rows if r["policy"] == p)) for p in self.policies}

    def values(self, metric: str, policy: str, score, budget=None) -> list[float]:
        value, scale, _, _ = METRICS[metric]
        return [value(r) * scale for r in self.rows
                if r["policy"] == policy and r["score"] == score and (policy == FULL or r["budget"] == budget)]

    def mean(self, metric: str, policy: str, score, budget=None) -> float | None:
        values = self.values(metric, policy, score, budget)
        return mean(values) if values else None

    def table(self, metric: str) -> str:
        fmt = METRICS[metric][2]
        head = "| policy | score | " + " | ".join(_budget_label(b) for b in self.budgets) + " |"
        lines = [head, "|---|---|" + "---:|" * len(self.budgets)]
        full = self.mean(metric, FULL, None)
        if full is not None:
            n = len(self.values(metric, FULL, None))
            lines.append(f"| full cache | | {fmt.format(full)} (n={n}) |" + " |" * (len(self.budgets) - 1))
        for policy in self.policies + [p for p in ("oracle", "greedy") if any(r["policy"] == p for r in self.rows)]:
            for score in self.scores.get(policy, [policy]):
                cells = []
                for budget in self.budgets:
                    value = self.mean(metric, policy, score, budget)
                    base = self.mean(metric, policy, "attention", budget)
                    cell = "" if value is None else fmt.format(value)
                    if value is not None and base is not None and score not in ("attention", None, policy):
                        cell += f" ({'+' if value - base >= 0 else '-'}{fmt.format(abs(value - base))})"
                    cells.append(cell)
                lines.append(f"| {policy} | {score or '-'} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def gap_table(self) -> str:
        """Fraction of the attention-to-oracle error gap each non-attention score closes (oracle task)."""
        head = "| policy | score | " + " | ".join(_budget_label(b) for b in self.budgets) + " |"
        lines = [head, "|---|---|" + "---:|" * len(self.budgets)]
        for policy in self.policies:
            for score in self.scores[policy]:
                if score in ("attention", None):
                    continue
                cells = []
                for budget in self.budgets:
                    base, value = self.mean("error", policy, "attention", budget), self.mean("error", policy, score, budget)
                    oracle = self.mean("error", "oracle", "oracle", budget)
                    gap = None if None in (base, value, oracle) or base - oracle <= 0 else (base - value) / (base - oracle)
                    cells.append("" if gap is None else f"{gap:+.0%}")
                lines.append(f"| {policy} | {score} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _legend(fig, axes, *, columns: int | None = None, fontsize=None) -> int:
    """One figure legend below the panels, each label once; returns the number of entries."""
    handles: dict = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(columns or len(handles), len(handles)),
               frameon=False, fontsize=fontsize)
    return len(handles)


def _curves(plt, group: _Group, metrics: list[str], path: Path, title: str, extra=("oracle", "greedy")) -> None:
    """One row of panels per metric, one column per policy: metric vs budget, a line per score."""
    fig, axes = plt.subplots(len(metrics), len(group.policies), figsize=(3.6 * len(group.policies), 2.9 * len(metrics)),
                             squeeze=False, sharex=True)
    x = list(range(len(group.budgets)))
    for row, metric in enumerate(metrics):
        for col, policy in enumerate(group.policies):
            ax = axes[row][col]
            curves = [(policy, s) for s in group.scores[policy]] + [(e, e) for e in extra]
            for name, score in curves:
                ys = [group.mean(metric, name, score, b) for b in group.budgets]
                if all(y is None for y in ys):
                    continue
                dashed = name in ("oracle", "greedy")
                ax.plot(x, [float("nan") if y is None else y for y in ys], marker="o", ms=3,
                        ls="--" if dashed else "-", color=SCORE_STYLE.get(score, "tab:brown"), label=score or "sinks + recent")
            full = group.mean(metric, FULL, None)
            if full is not None:
                ax.axhline(full, color="gray", ls=":", lw=1.2, label="full cache")
            ax.set_xticks(x, [_budget_label(b) for b in group.budgets])
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(policy)
            if col == 0:
                ax.set_ylabel(METRICS[metric][3])
            if row == len(metrics) - 1:
                ax.set_xlabel("budget (fraction kept)")
            if metric == "kl" and any(v > 0 for v in ax.get_lines()[0].get_ydata()):
                ax.set_yscale("log")
    _legend(fig, axes)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _heatmaps(plt, group: _Group, metric: str, path: Path, title: str) -> str:
    """`metric` over needle depth x length, a panel per (policy, score), at the budget whose mean is closest to 50%."""
    value, scale = METRICS[metric][0], METRICS[metric][1]
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
    fig.suptitle(f"{title}\n{METRICS[metric][3]} by needle depth (rows) x length (cols), budget {_budget_label(budget)}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return _budget_label(budget)


def _layer_errors(plt, group: _Group, path: Path, title: str) -> str:
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
    fig.suptitle(f"{title}: per-layer attention-output error at budget {_budget_label(budget)}")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return _budget_label(budget)


def _positions(plt, group: _Group, path: Path, title: str) -> None:
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
        ax.set_title(f"budget {_budget_label(budget)}")
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
           "Budgets are the fraction of the prompt KEPT per layer and KV head. Cells are means over samples; "
           "after an OBCache score, in parentheses, its difference to the `attention` score of the same policy.",
           "Needle tasks: accuracy is RULER's string match of all expected values; 'answer prefix recovered' "
           "gives partial credit (the longest prefix of each expected value found in the answer)."]
    several = Counter(key[:3] for key in groups)  # (task, mode, model) run under several settings
    for (task, mode, model, settings), group_rows in sorted(groups.items()):
        family, group, apart = family_of(task), _Group(group_rows), several[(task, mode, model)] > 1
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{task}_{mode}_{model}" + (f"_{settings}" if apart else ""))
        versions = group_rows[0].get("versions", {})
        n = len({(r["length"], r["depth"], r["sample"]) for r in group_rows})
        out += ["", f"## {task} ({mode}), {model}" + (f"; {settings}" if apart else ""), "",
                f"{n} samples; lengths {sorted({r['length'] for r in group_rows})}; settings: {settings}; "
                f"versions {', '.join(f'{k} {v}' for k, v in versions.items())}.", ""]
        description = family.describe(group_rows)
        if description:
            out.append(description)
        for metric in family.metrics:
            out += ["", f"**{METRICS[metric][3]}**", "", group.table(metric)]
        if family.gap_table:
            out += ["", "**fraction of the attention-to-oracle error gap closed**", "", group.gap_table()]
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
        for metric in family.metrics if family.heatmaps else ():
            heat = folder / f"{slug}_{metric}_heatmap.png"
            budget = _heatmaps(plt, group, metric, heat, f"{task} ({mode}), {model}")
            out += ["", f"{METRICS[metric][3]} by depth and length at budget {budget} (the budget whose mean "
                    "is closest to 50%):", "", f"![{task} {mode} {metric} heatmap]({heat.name})"]
    path = folder / "report.md"
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _settings_text(settings: dict | None) -> str:
    """'dtype float32, attn sdpa, future 256' (rows written before settings were recorded: 'not recorded')."""
    if settings is None:
        return "not recorded"
    return ", ".join(f"{name} {'default' if value is None else value}" for name, value in settings.items())
