"""stats.py against independent computations, and the report's intervals, paired comparisons and summary."""

from __future__ import annotations

import itertools
import json
import math
import random
from statistics import NormalDist

import numpy as np
import pytest

from obcache.evaluation.report import write_report
from obcache.evaluation.stats import (
    estimate, holm, is_binary, mean_interval, paired, sign_test, t_cdf, t_quantile, wilson,
)
from obcache.evaluation.tables import METRICS, Group

Z = NormalDist().inv_cdf(0.975)

# ---------------------------------------------------------------- Wilson


@pytest.mark.parametrize("successes,n,low,high", [  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
])
def test_wilson_matches_newcombes_table(successes, n, low, high):
    assert wilson(successes, n) == pytest.approx((low, high), abs=6e-5)


@pytest.mark.parametrize("successes,n", [(0, 5), (1, 5), (3, 7), (16, 24), (24, 24), (50, 1000)])
def test_wilson_bounds_are_where_the_score_test_equals_z(successes, n):
    """The Wilson interval is the set of p0 the score test accepts: |p - p0| / sqrt(p0 (1 - p0) / n) <= z."""
    p = successes / n
    for bound in wilson(successes, n):
        if 0 < bound < 1:
            assert abs(p - bound) / math.sqrt(bound * (1 - bound) / n) == pytest.approx(Z, rel=1e-9)
    low, high = wilson(successes, n)
    grid = np.linspace(1e-9, 1 - 1e-9, 20001)
    accepted = grid[np.abs(p - grid) / np.sqrt(grid * (1 - grid) / n) <= Z]
    assert accepted.min() == pytest.approx(low, abs=1e-4) and accepted.max() == pytest.approx(high, abs=1e-4)


@pytest.mark.parametrize("successes,n", [(0, 0), (3, 2), (-1, 4)])
def test_wilson_rejects_impossible_counts(successes, n):
    with pytest.raises(ValueError):
        wilson(successes, n)


# ---------------------------------------------------------------- Student t


@pytest.mark.parametrize("p,df,value", [  # the usual t tables (to 9 digits)
    (0.975, 1, 12.706204736), (0.975, 2, 4.302652730), (0.975, 3, 3.182446305), (0.975, 4, 2.776445105),
    (0.975, 5, 2.570581836), (0.975, 9, 2.262157163), (0.975, 10, 2.228138852), (0.975, 23, 2.068657610),
    (0.975, 30, 2.042272456), (0.975, 60, 2.000297822), (0.975, 120, 1.979930405),
    (0.95, 1, 6.313751515), (0.95, 10, 1.812461123), (0.95, 30, 1.697260887), (0.995, 10, 3.169272673),
])
def test_t_quantile_matches_the_tables(p, df, value):
    assert t_quantile(p, df) == pytest.approx(value, abs=2e-9)
    assert t_quantile(1 - p, df) == pytest.approx(-value, abs=2e-9)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantile_matches_the_closed_forms_of_one_and_two_df(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)  # Cauchy
    assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 30, 101])
@pytest.mark.parametrize("t", [-3.0, -0.4, 0.0, 1.3, 2.2, 8.0])
def test_t_cdf_matches_numerical_integration_of_the_density(df, t):
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    x = np.linspace(0.0, abs(t), 200_001)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
    h = x[1] - x[0] if abs(t) > 0 else 0.0
    area = h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())  # Simpson
    assert t_cdf(t, df) == pytest.approx(0.5 + math.copysign(area, t), abs=1e-10)


def test_t_quantile_tends_to_the_normal_and_rejects_bad_input():
    assert t_quantile(0.975, 100_000) == pytest.approx(Z, abs=1e-4)
    assert t_quantile(0.975, 100_000) > Z
    for p, df in ((0.0, 3), (1.0, 3), (0.5, 0)):
        with pytest.raises(ValueError):
            t_quantile(p, df) if df else t_cdf(p, df)


def test_mean_interval_by_hand():
    e = mean_interval([0.1, 0.2, 0.3, 0.4, 0.5])  # s = sqrt(0.025), s / sqrt(5) = 0.0707107, t(0.975, 4) = 2.776445
    assert (e.mean, e.n, e.method) == (pytest.approx(0.3), 5, "t")
    assert (e.low, e.high) == pytest.approx((0.3 - 0.1963243, 0.3 + 0.1963243), abs=1e-7)
    single = mean_interval([4.0])
    assert single.mean == 4.0 and math.isnan(single.low) and math.isnan(single.high) and single.method == "none"
    constant = mean_interval([2.0, 2.0, 2.0])  # no spread, no width
    assert (constant.low, constant.high) == (2.0, 2.0)


def test_estimate_uses_wilson_for_zero_one_values_only():
    binary = estimate([1.0, 0.0, 1, 1], proportion=True)
    assert binary.method == "wilson" and (binary.low, binary.high) == wilson(3, 4) and binary.mean == 0.75
    assert estimate([1.0, 0.5, 0.0], proportion=True).method == "t"  # a multi-value task's partial credit
    assert estimate([1.0, 1.0, 1.0]).method == "t"  # a continuous metric that happens to be constant
    assert is_binary([0, 1.0, True]) and not is_binary([0, 0.5])


# ---------------------------------------------------------------- sign test, McNemar, paired comparison, Holm


def test_sign_test_equals_brute_force_enumeration():
    """p = the share of all 2^m equally likely sign patterns at least as unbalanced as the observed one."""
    for m in range(13):
        patterns = list(itertools.product((1, -1), repeat=m))
        for wins in range(m + 1):
            observed = abs(2 * wins - m)
            extreme = sum(abs(sum(signs)) >= observed for signs in patterns)
            assert sign_test(wins, m - wins) == pytest.approx(extreme / len(patterns), abs=1e-15), (wins, m)


@pytest.mark.parametrize("wins,losses,p", [
    (9, 1, 22 / 1024),  # 2 (C(10,0) + C(10,1)) / 2^10
    (15, 5, 2 * 21700 / 2**20),  # sum_{k<=5} C(20,k) = 1 + 20 + 190 + 1140 + 4845 + 15504 = 21700
    (5, 0, 2 / 32), (6, 0, 2 / 64), (0, 0, 1.0), (3, 3, 1.0), (100, 40, None),
])
def test_sign_test_textbook_values(wins, losses, p):
    if p is None:  # far in the tail: matches the normal approximation's order of magnitude and stays positive
        assert 0 < sign_test(wins, losses) < 1e-5
    else:
        assert sign_test(wins, losses) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_on_binary_pairs():
    """b = 1 (only attention right), c = 9 (only the score right), 14 concordant pairs: p = 22/1024."""
    score = [1] * 9 + [0] * 1 + [1] * 7 + [0] * 7
    base = [0] * 9 + [1] * 1 + [1] * 7 + [0] * 7
    result = paired(score, base, proportion=True)
    assert (result.n, result.wins, result.ties, result.losses, result.test) == (24, 9, 14, 1, "McNemar exact")
    assert result.p == pytest.approx(22 / 1024) and result.difference.mean == pytest.approx(8 / 24)


def test_paired_comparison_by_hand():
    # d = [2, 0, 2, 3]: mean 1.75, s^2 = 4.75 / 3, half width t(0.975, 3) s / 2 = 3.182446 * 1.258306 / 2 = 2.002245
    higher = paired([3, 5, 4, 6], [1, 5, 2, 3])
    assert (higher.n, higher.wins, higher.ties, higher.losses, higher.test) == (4, 3, 1, 0, "sign test")
    assert higher.difference.mean == 1.75 and higher.p == 0.25
    assert (higher.difference.low, higher.difference.high) == pytest.approx((1.75 - 2.002245, 1.75 + 2.002245), abs=1e-6)
    lower = paired([3, 5, 4, 6], [1, 5, 2, 3], higher_is_better=False)
    assert (lower.wins, lower.ties, lower.losses, lower.p) == (0, 1, 3, 0.25)
    with pytest.raises(ValueError):
        paired([1, 2], [1, 2, 3])


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == [1.0, 1.0] and holm([]) == []


# ---------------------------------------------------------------- the report


def test_every_metric_has_a_direction():
    assert {name: m.better for name, m in METRICS.items()} == {
        "accuracy": "higher", "exact": "higher", "prefix": "higher", "top1": "higher",
        "perplexity": "lower", "kl": "lower", "error": "lower", "layer_error": "lower", "cost": "lower", "bytes": "lower"}


def test_cost_is_the_compressing_prefill_over_the_plain_one():
    assert METRICS["cost"].value({"prefill_seconds": 2.0, "select_seconds": 3.0}) == 2.5
    assert METRICS["cost"].value({"prefill_seconds": 2.0, "select_seconds": 0.0}) == 1.0  # the full cache


def _row(task: str, policy: str, score, budget, sample: int, **fields) -> dict:
    needle = task.startswith("niah")
    settings = {"dtype": "float32", "attn": "sdpa", **({"max_new_tokens": None} if needle else {"future": 8})}
    return {"task": task, "mode": "query-aware" if needle else "teacher-forced", "model": "m", "seed": 0,
            "length": 300, "depth": (0.1, 0.9)[sample % 2] if needle else None, "sample": sample // 2 if needle else sample,
            "policy": policy, "policy_repr": policy, "score": score, "budget": budget, "settings": settings, **fields}


def _needle(policy: str, score, budget, sample: int, correct: bool, **exact) -> dict:
    return _row("niah_single_number", policy, score, budget, sample, prediction="1234567" if correct else "12",
                expected=["1234567"], correct=float(correct), **exact)


def _fidelity(policy: str, score, budget, sample: int, kl: float, perplexity: float, top1: float) -> dict:
    return _row("fidelity", policy, score, budget, sample, kl=kl, perplexity=perplexity, top1=top1,
                layer_errors=[kl, 2 * kl], future=8)


def needle_rows() -> list[dict]:
    """24 samples (2 depths x 12): full 20/24; snapkv at 0.1: attention 6/24, obc-joint 16/24 (10 wins, 0 losses);
    at 0.5: attention 12/24, obc-joint 11/24 (1 win, 2 losses); streamingllm 0/24. One obc-joint row is missing."""
    rows = []
    for i in range(24):
        rows += [_needle("full", None, None, i, i < 20), _needle("snapkv", "attention", 0.1, i, i < 6),
                 _needle("snapkv", "obc-joint", 0.1, i, i < 16), _needle("snapkv", "attention", 0.5, i, i < 12),
                 _needle("streamingllm", None, 0.1, i, False), _needle("streamingllm", None, 0.5, i, False),
                 _needle("snapkv", "obc-joint", 0.5, i, i < 10 or i == 12), _needle("snapkv", "attention", 0.2, i, i < 3)]
        if i != 23:  # sample 23 has no obc-joint row at 0.2: 23 pairs
            rows.append(_needle("snapkv", "obc-joint", 0.2, i, i < 3))
    random.Random(0).shuffle(rows)  # pairing goes by sample, not by file order
    return rows


def fidelity_rows() -> list[dict]:
    """5 samples at budget 0.2: attention kl 0.1..0.5; obc-joint 0.01..0.05 lower each (5 wins); perplexity and top1."""
    rows = []
    for i in range(5):
        kl = 0.1 * (i + 1)
        rows += [_fidelity("full", None, None, i, 0.0, 1.0 + i, 1.0),
                 _fidelity("snapkv", "attention", 0.2, i, kl, (1.0, 1.0, 1.0, 1.0, 9.0)[i], 0.5),
                 _fidelity("snapkv", "obc-joint", 0.2, i, kl - 0.01 * (i + 1), 2.0, (0.5, 0.5, 0.5, 0.6, 0.4)[i])]
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> str:
    """The report of needle_rows() and fidelity_rows(), rendered once for the module."""
    tmp_path = tmp_path_factory.mktemp("report")
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in needle_rows() + fidelity_rows()))
    return write_report(tmp_path).read_text()


def section(text: str, task: str) -> str:
    return text.split(f"## {task}")[1].split("\n## ")[0]


def test_cells_show_mean_wilson_interval_and_n(report):
    needle = section(report, "niah_single_number")
    # Wilson by hand: 16/24 -> [0.467, 0.820], 12/24 -> [0.314, 0.686], 6/24 -> [0.120, 0.449], 0/24 -> [0, 0.138]
    assert "| full cache | | 83 [64, 93] n=24 | | |" in needle
    assert "| snapkv | attention | 25 [12, 45] n=24 | 12 [4, 31] n=24 | 50 [31, 69] n=24 |" in needle
    assert "| snapkv | obc-joint | 67 [47, 82] n=24 | 13 [5, 32] n=23 | 46 [28, 65] n=24 |" in needle
    assert "| streamingllm | - | 0 [0, 14] n=24 |  | 0 [0, 14] n=24 |" in needle
    assert "**accuracy (%)** (higher is better)" in needle


def test_cells_of_continuous_metrics_show_the_t_interval_clipped_to_the_range(report):
    fidelity = section(report, "fidelity")
    assert "| snapkv | attention | 0.300 [0.104, 0.496] n=5 |" in fidelity  # 0.3 +- 2.776445 * 0.0707107
    assert "| snapkv | obc-joint | 0.270 [0.093, 0.447] n=5 |" in fidelity  # 0.27 +- 2.776445 * 0.0636396
    # perplexity 1, 1, 1, 1, 9: 2.6 +- 2.776445 * 1.6 = [-1.84, 7.04], clipped at 1 (no perplexity is below 1)
    assert "| snapkv | attention | 2.60 [1.00, 7.04] n=5 |" in fidelity
    assert "| full cache | | 0.000 [0.000, 0.000] n=5 |" in fidelity and "**KL(full || evicted), nats/token** (lower" in fidelity


def test_paired_comparisons_of_a_binary_metric(report):
    needle = section(report, "niah_single_number")
    paired_part = needle.split("### Paired comparisons against attention")[1]
    # 0.1: d = 10 ones, 14 zeros: 0.4167 +- 2.068658 * 0.102799 = [0.204, 0.629]; McNemar exact 2 / 2^10
    assert "| snapkv | obc-joint | 0.1 | 24 | +42 [+20, +63] | 10/14/0 | **0.002** | **obc-joint** |" in paired_part
    # 0.2: only the 23 samples both have
    assert "| snapkv | obc-joint | 0.2 | 23 | +0 [+0, +0] | 0/23/0 | 1.000 |  |" in paired_part
    # 0.5: d = +1, -1, -1, 21 zeros: -0.0417 +- 2.068658 * 0.073207 = [-0.193, 0.110]; p = 1
    assert "| snapkv | obc-joint | 0.5 | 24 | -4 [-19, +11] | 1/21/2 | 1.000 |  |" in paired_part
    assert "streamingllm" not in paired_part.split("![")[0]  # no attention score to compare with


def test_paired_comparisons_of_a_lower_is_better_metric(report):
    fidelity = section(report, "fidelity").split("### Paired comparisons against attention")[1]
    # d = -0.01 .. -0.05: -0.03 +- 2.776445 * 0.00707107 = [-0.0496, -0.0104]; 5 wins, p = 2/32: not significant
    assert "| snapkv | obc-joint | 0.2 | 5 | -0.030 [-0.050, -0.010] | 5/0/0 | 0.062 |  |" in fidelity
    # top1 (higher is better): +0, +0, +0, +10, -10 points: 1 win, 1 loss; 0 +- 2.776445 * sqrt(50 / 5)
    assert "| snapkv | obc-joint | 0.2 | 5 | +0.0 [-8.8, +8.8] | 1/3/1 | 1.000 |  |" in fidelity


def test_summary_names_the_best_per_budget_and_counts_significant_comparisons(report):
    needle = section(report, "niah_single_number")
    summary = next(line for line in needle.splitlines() if line.startswith("**Summary.**"))
    assert ("*accuracy (%)*, higher is better. Best at budget 0.1: snapkv + obc-joint 67 [47, 82] n=24; "
            "0.2: snapkv + obc-joint 13 [5, 32] n=23; 0.5: snapkv + attention 50 [31, 69] n=24 "
            "(full cache 83 [64, 93] n=24).") in summary
    assert ("Paired against attention: of 3 comparisons, 1 favour the OBCache score (or exact-removal) at p < 0.05 "
            "and 0 favour attention (1 and 0 after Holm correction over the 3); 2 comparisons have fewer than 6 "
            "non-tied pairs and cannot reach p < 0.05.") in summary
    fidelity = section(report, "fidelity")
    assert ("*KL(full || evicted), nats/token*, lower is better. Best at budget 0.2: snapkv + obc-joint "
            "0.270 [0.093, 0.447] n=5 (full cache 0.000 [0.000, 0.000] n=5). Paired against attention: of "
            "1 comparison, 0 favour") in fidelity


def test_best_reports_ties():
    rows = [_needle("snapkv", score, 0.1, i, i < 2) for score in ("attention", "obc-key") for i in range(4)]
    group = Group(rows)
    name, e, ties = group.best("accuracy", 0.1)
    assert (name, e.mean, e.n, ties) == ("snapkv + attention", 50.0, 4, 1)
    assert "(tied with 1 other)" in group.summary(["accuracy"])


def test_streaming_perplexity_is_also_paired_per_stretch_of_text(tmp_path):
    """Two texts of 3 stretches: attention 10, 12, 14 / 20, 22, 24; obc-key 1 lower on 5 stretches, 1 higher on
    one. Per stretch: 6 pairs, 5 wins and 1 loss (sign test p = 2 x 7/64 = 0.219)."""
    def row(score, sample, buckets):
        return {"task": "perplexity", "mode": "streaming", "model": "m", "seed": 0, "length": 1536, "depth": None,
                "sample": sample, "policy": "h2o", "policy_repr": "h2o", "score": score, "budget": 256,
                "settings": {"dtype": "float32", "attn": "sdpa", "stream_chunk": 64}, "bucket": 512,
                "stream_chunk": 64, "perplexity": sum(buckets) / 3, "bucket_perplexities": buckets}
    rows = [row("attention", 0, [10, 12, 14]), row("obc-key", 0, [9, 11, 13]),
            row("attention", 1, [20, 22, 24]), row("obc-key", 1, [19, 21, 25])]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(tmp_path).read_text()
    per_text, per_stretch = text.split("**perplexity, paired per 512-token stretch of each text")
    assert "| h2o | obc-key | 256 tok | 2 |" in per_text  # two texts: -1, -2/3
    # d = [-1]*5 + [+1]: mean -0.667, sd = sqrt((5 * (1/3)^2 + (5/3)^2) / 5) = 0.8165; t(5) 2.570582 * 0.8165 / sqrt(6)
    assert "| h2o | obc-key | 256 tok | 6 | -0.67 [-1.52, +0.19] | 5/0/1 | 0.219 |  |" in per_stretch


def test_the_exact_match_has_its_own_table_and_rows_without_it_are_shown_as_missing(tmp_path):
    """Full cache exact 12/24, snapkv + attention 6/24 (Wilson by hand: [31, 69], [12, 45]); the obc-joint rows
    were written before the exact match was recorded: empty cells, counted in a note, never compared."""
    rows = []
    for i in range(24):
        rows += [_needle("full", None, None, i, i < 20, exact=float(i < 12)),
                 _needle("snapkv", "attention", 0.1, i, i < 16, exact=float(i < 6)),
                 _needle("snapkv", "obc-joint", 0.1, i, i < 16)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    needle = section(write_report(tmp_path).read_text(), "niah_single_number")
    exact = needle.split("**exact match (%)** (higher is better)")[1].split("**")[0]
    assert "| full cache | | 50 [31, 69] n=24 |" in exact
    assert "| snapkv | attention | 25 [12, 45] n=24 |" in exact and "| snapkv | obc-joint |  |" in exact
    assert "24 of 72 rows do not record the exact match (written before it was recorded): they are left out." in exact
    assert "| snapkv | obc-joint | 67 [47, 82] n=24 |" in needle.split("**accuracy (%)**")[1]  # string match as before
    paired = needle.split("### Paired comparisons against attention")[1]
    assert "**exact match (%)**" not in paired  # no pairs: obc-joint has no exact values
