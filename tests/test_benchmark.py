"""The benchmark: its plan of policies, its capture through the library's hooks, targets and report.

Timings are never asserted here: the targets live in `obcache bench`'s output.
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from obcache import AdaKV, PyramidKV, SnapKV, TOVA
from obcache.bench.cli import DEFAULT_LENGTHS, plan_from_args, register, run
from obcache.bench.measure import measure_eviction, recorded_prefill
from obcache.bench.memory import run_memory_worker
from obcache.bench.report import TARGETS, check_targets, format_report
from obcache.cache import EvictableCache
from tests.conftest import tiny_model


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["bench", *argv])


# ---------------------------------------------------------------- command line and plan


def test_default_plan_compares_adakv_with_uniform_snapkv_obc_joint():
    args = parse()
    assert args.lengths == list(DEFAULT_LENGTHS) and callable(args.run)
    plan = plan_from_args(args)
    assert plan.policies["mode"] == AdaKV(SnapKV(budget=0.1, score="obc-joint", window=16), alpha=0.2)
    assert plan.uniform == "snapkv/obc-joint"
    assert plan.policies[plan.uniform] == SnapKV(budget=0.1, score="obc-joint")
    assert plan.policies["budget 0.05"] == SnapKV(budget=0.05, score="obc-joint")
    assert len(plan.grid) == 3 * 5 + 1 and plan.window == 16


def test_mode_flags_shape_the_mode_and_the_uniform_policy_drops_them():
    args = parse("--allocation", "pyramid", "--beta", "10", "--selection", "shared", "--chunk", "4", "--window", "8",
                 "--budget", "0.2", "--lengths", "512")
    plan = plan_from_args(args)
    expected = SnapKV(budget=0.2, score="obc-joint", window=8, selection="shared", chunk=4)
    assert plan.policies["mode"] == PyramidKV(expected, beta=10.0)
    assert plan.policies[plan.uniform] == SnapKV(budget=0.2, score="obc-joint", window=8)
    assert plan.policies["tova/obc-joint"] == TOVA(budget=0.2, score="obc-joint")  # no window option: skipped
    assert plan.specs["uniform"]["allocation"] == "uniform" and plan.specs["mode"]["options"]["chunk"] == 4
    assert plan.window == 8 and json.loads(json.dumps(plan.specs)) == plan.specs  # the memory worker's config


@pytest.mark.parametrize("argv, message", [
    (["--policy", "none"], "give a policy"),
    (["--decode-budget", "64"], "not benchmarked"),
    (["--lengths", "12"], "window"),
    (["--policy", "tova", "--window", "8"], "no option --window"),
    (["--allocation", "adakv", "--selection", "shared"], "per-head"),
])
def test_bad_plans_fail_before_any_model_work(argv, message):
    with pytest.raises(ValueError, match=message):
        plan_from_args(parse(*argv))


# ---------------------------------------------------------------- the library's eviction path


def test_recorded_masks_evict_as_the_hooks_do():
    model = tiny_model()
    ids = torch.randint(1, 500, (1, 96), generator=torch.Generator().manual_seed(1))
    policies = {"uniform": SnapKV(budget=0.25, score="obc-joint"), "mode": AdaKV(SnapKV(budget=0.25, score="obc-joint"))}
    recorder, cache = recorded_prefill(model, ids, policies, window=16)
    seconds = measure_eviction(recorder, cache, torch.device("cpu"), list(policies))
    assert all(s["select"] > 0 and s["keep"] > 0 for s in seconds.values())
    assert set(recorder.windows) == {0, 1} and recorder.full_state.layer_idx == 1
    assert recorder.windows[0].queries.shape == (1, 6, 16, 8)
    for key, policy in policies.items():
        hooked = EvictableCache()
        with policy.attach(model), torch.no_grad():
            model(input_ids=ids, past_key_values=hooked, use_cache=True)
        recorded = cache.subset(recorder.masks[key])
        assert recorded.nbytes() == hooked.nbytes() < cache.nbytes()
        for layer in range(2):
            for mine, theirs in zip(recorded.kept_positions(layer)[0], hooked.kept_positions(layer)[0]):
                assert torch.equal(mine, theirs)
    assert cache.is_ragged(0) is False and recorded.is_ragged(0)  # AdaKV heads keep different counts here


def test_bench_runs_end_to_end_on_a_tiny_random_model(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = run(parse("--random-weights", "tiny", "--lengths", "64", "--budget", "0.5", "--budgets", "0.25", "0.5",
                       "--new-tokens", "2", "--repeats", "1", "--no-memory", "--threads", "1", "--out", str(out)))
    assert json.loads(out.read_text())["mode"] == report["mode"] == "adakv(snapkv)"
    row = report["lengths"][0]
    assert set(row["caches"]) == set(row["decode"]) - {"full attached"} == {"full", "budget 0.25", "budget 0.5", "mode"}
    assert row["caches"]["mode"]["layout"] == "ragged" and row["caches"]["budget 0.5"]["kept_shape"] == [1, 2, 32, 16]
    assert abs(row["caches"]["mode"]["bytes_error"]) < 1e-9  # AdaKV conserves budget x heads per layer
    assert {t["key"] for t in report["targets"]} == set(TARGETS) - {"peak_memory", "mode_peak_memory"}
    assert "| measure | full cache | snapkv/obc-joint | adakv(snapkv) |" in capsys.readouterr().out


def test_memory_worker_runs_a_policy_spec_in_a_fresh_process():
    plan = plan_from_args(parse("--budget", "0.5", "--budgets", "0.5", "--lengths", "64"))
    config = {"length": 64, "model": None, "random_weights": "tiny", "attn": "sdpa", "dtype": None, "device": "cpu",
              "threads": 1, "policy": plan.specs["mode"]}
    result = run_memory_worker(config)
    full = 2 * 2 * 64 * 16 * 4 * 2  # layers x (K, V) x tokens x d x float32 x KV heads
    assert result["cache_bytes"] == full // 2 and result["peak_bytes"] > 0 and result["eviction_seconds"] > 0


# ---------------------------------------------------------------- targets and report on synthetic data


def synthetic_report(*, mode_decode: float = 15.0, mode_peak: float = 900.0, overhead: float = 0.01,
                     mode_kv_heads: int = 3, extra_peak: float = 0.05) -> dict:
    """A report as `obcache bench` writes it, at 8k with round numbers (MiB, seconds, tok/s)."""
    mib, full = 2**20, 360 * 2**20

    def cache(fraction, layout="uniform", heads=3, error=0.0):
        return {"cache_bytes": fraction * full * (1 + error), "index_bytes": 0.005 * fraction * full, "kv_heads": heads,
                "head_tokens": [819, 819] if layout == "uniform" else [164, 2000], "layout": layout,
                "kept_shape": [1, 3, 819, 64] if layout == "uniform" else None, "expected_bytes": fraction * full,
                "bytes_error": error}

    row = {
        "length": 8192, "prefill_seconds": 40.0,
        "hooked": {"uniform": {"seconds": 41.0, "eviction_seconds": 0.4}, "mode": {"seconds": 41.0, "eviction_seconds": 0.5}},
        "eviction_seconds": {"snapkv/obc-joint": {"select": overhead * 40.0, "keep": 0.0},
                             "mode": {"select": 0.3, "keep": 0.1}},
        "scoring_seconds": {"q.k product alone": 0.002, "attention": 0.004, "obc-joint": 0.006},
        "caches": {"full": {**cache(1.0), "head_tokens": [8192, 8192]}, "budget 0.1": cache(0.1),
                   "mode": cache(0.1, "ragged", mode_kv_heads, error=-0.002)},
        "decode": {"full": 6.0, "full attached": 5.9, "budget 0.1": 12.0, "mode": mode_decode},
        "full_history": [{"score": "obc-joint", "seconds": 2.5, "extra_peak_bytes": extra_peak * full,
                          "cache_bytes": full, "l_by_l_bytes": 2304 * mib}],
        "memory": {"plain": {"baseline_bytes": 960 * mib, "peak_bytes": 1000 * mib},
                   "uniform": {"peak_bytes": 800 * mib}, "mode": {"peak_bytes": mode_peak * mib}},
    }
    shorter = copy.deepcopy(row) | {"length": 2048, "decode": {**row["decode"], "mode": 1.0}}  # must not be judged
    report = {"machine": {"torch_threads": 2}, "model": "m", "device": "cpu", "dtype": "torch.float32", "attn": "sdpa",
              "budget": 0.1, "uniform": "snapkv/obc-joint", "mode": "adakv(snapkv)", "kv_heads": 3,
              "lengths": [shorter, row]}
    report["targets"] = check_targets(report)
    return report


def passed(report: dict) -> dict[str, bool]:
    return {t["key"]: t["passed"] for t in report["targets"]}


def test_targets_all_pass_on_a_good_run_at_the_longest_length():
    report = synthetic_report()
    assert passed(report) == dict.fromkeys(TARGETS, True) and {t["length"] for t in report["targets"]} == {8192}
    assert len(report["targets"]) == len(TARGETS)  # one full-history score and one budget here


@pytest.mark.parametrize("change, key, ok", [
    ({"mode_decode": 8.9}, "mode_decode_vs_uniform", False),  # 0.74x the uniform cache
    ({"mode_decode": 9.0}, "mode_decode_vs_uniform", True),  # exactly 0.75x
    ({"mode_decode": 8.9}, "mode_decode_vs_full", False),  # 1.48x the full cache
    ({"mode_decode": 9.0}, "mode_decode_vs_full", True),  # exactly 1.5x
    ({"mode_peak": 1000.0}, "mode_peak_memory", True),  # no higher than the plain prefill
    ({"mode_peak": 1001.0}, "mode_peak_memory", False),
    ({"overhead": 0.03}, "overhead", True),
    ({"overhead": 0.031}, "overhead", False),
    ({"mode_kv_heads": 9}, "mode_cache_bytes", False),  # right bytes, but heads repeated to the query heads
    ({"extra_peak": 0.1}, "full_history_memory", False),
])
def test_each_target_passes_or_misses_at_its_limit(change, key, ok):
    assert passed(synthetic_report(**change))[key] is ok


@pytest.mark.parametrize("slowdowns, warned", [([1.1, 0.9], False), ([1.2, 40.0], True), ([None, None], False)])
def test_report_warns_when_other_processes_held_the_cpu(slowdowns, warned):
    report = synthetic_report()
    report["machine"]["oversubscription"] = slowdowns
    assert ("WARNING: other processes held the CPU" in format_report(report)) is warned


def test_report_prints_side_by_side_ratios_and_pass_miss():
    text = format_report(synthetic_report(mode_decode=8.4))
    assert "| measure | 2048 | 8192 |" in text
    assert "| measure | full cache | snapkv/obc-joint | adakv(snapkv) |" in text
    assert "| decode tok/s (x full, x uniform) | 6.0 (1.00x, 0.50x) | 12.0 (2.00x, 1.00x) | 8.4 (1.40x, 0.70x) |" in text
    assert "| K/V cache MiB (x full) | 360.0 (1.000x) | 36.0 (0.100x) | 35.9 (0.100x) |" in text
    assert "| slot index KiB (% of K/V) |" in text and "(0.50%)" in text
    assert "| layout, kept tokens per KV head (min-max) | uniform, 8192-8192 | uniform, 819-819 | ragged, 164-2000 |" in text
    assert "  [MISS] decode, adakv(snapkv) / snapkv/obc-joint at budget 0.1: 0.700x (target >= 0.750x)" in text
    assert "  [PASS] adakv(snapkv) eviction / prefill: 1.00% (target <= 3.00%)" in text
    assert "  [PASS] adakv(snapkv) cache bytes error at budget 0.1: -0.20% (target within +/- 1.00%)" in text
