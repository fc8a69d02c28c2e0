#!/usr/bin/env python
"""Plot `obcache bench --layouts` results: decode tok/s of each layout as a ratio to the limit, per cell.

    python benchmarks/plot_layouts.py benchmarks/results-cpu-layouts-quiet.json docs/results/layouts/layouts-cpu.png [more.json ...]

Several JSON files (e.g. the same run at 1 and 2 threads) give one panel each.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def panel(axis, report: dict) -> None:
    entry = report["layouts"]
    cells = entry["cells"]
    labels = [f"{c['context'] // 1024}k x{c['batch']}" for c in cells]
    x = range(len(cells))
    width = 0.27
    for offset, key, color in ((-width, "full", "0.7"), (0, "uniform", "tab:blue"), (width, "paged", "tab:orange")):
        ratios = [c["tokens_per_second"][key] / c["tokens_per_second"]["limit"] for c in cells]
        axis.bar([i + offset for i in x], ratios, width, label=f"{key} / limit", color=color)
    axis.axhline(1.0, color="k", linewidth=0.8)
    axis.axhline(0.97, color="tab:red", linestyle="--", linewidth=0.8, label="target 0.97x (paged)")
    axis.set_xticks(list(x), labels, rotation=45)
    speeds = [c["tokens_per_second"] for c in cells]
    axis.set_ylim(0, max(1.15, 1.05 * max(s[k] / s["limit"] for s in speeds for k in ("uniform", "paged"))))
    axis.set_ylabel("decode tok/s / limit")
    axis.set_title(f"{report['model']}, {report['machine']['torch_threads']} thread(s), "
                   f"{entry['budget']:.0%} kept", fontsize=9)
    axis.legend(fontsize=7, loc="lower left")


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, inputs = argv[1], [argv[0], *argv[2:]]
    reports = [json.loads(open(path).read()) for path in inputs]
    figure, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4), squeeze=False)
    for axis, report in zip(axes[0], reports):
        panel(axis, report)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
