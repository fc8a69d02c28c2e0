"""The benchmark: its plan of policies, its capture through the library's hooks, targets and report.

Timings are never asserted here: the targets live in `obcache bench`'s output.
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from obcache import H2O, AdaKV, Decoding, PyramidKV, SnapKV, TOVA
from obcache.bench.cli import DEFAULT_LENGTHS, decode_plan_from_args, plan_from_args, register, run
from obcache.bench.measure import measure_eviction, recorded_prefill
from obcache.bench.memory import run_memory_worker
from obcache.bench.report import DECODE_TARGETS, TARGETS, check_targets, format_report
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
    (["--decode-budget", "64"], "add --decode"),
    (["--lengths", "12"], "window"),
    (["--policy", "tova", "--window", "8"], "no option --window"),
    (["--allocation", "adakv", "--selection", "shared"], "per-head"),
    (["--decode", "--decode-policy", "tova", "--window", "8"], "no option --window"),
    (["--decode", "--decode-budget", "8"], "protected"),
    (["--decode", "--decode-interval", "0"], "interval"),
    (["--decode", "--decode-timed", "600", "--decode-tokens", "512"], "more than"),
    (["--decode", "--decode-rounds", "0"], "--decode-rounds"),
    (["--decode", "--decode-context", "8"], "window"),
    (["--decode", "--policy", "none"], "give a policy"),
])
def test_bad_plans_fail_before_any_model_work(argv, message):
    args = parse(*argv)
    with pytest.raises(ValueError, match=message):
        (decode_plan_from_args if args.decode else plan_from_args)(args)


def test_decode_plan_wraps_the_uniform_policy_in_decoding_at_every_interval():
    plan = decode_plan_from_args(parse("--decode"))
    snapkv = SnapKV(budget=512, score="obc-joint", window=16)
    assert plan.policy == snapkv and plan.label == "snapkv/obc-joint" and plan.interval == 16
    assert plan.evicting == {k: Decoding(snapkv, capacity=512, interval=k) for k in (1, 16, 64)}
    assert (plan.context, plan.new_tokens, plan.timed, plan.rounds, plan.full_length) == (2048, 2048, 512, 3, 3584)
    plan = decode_plan_from_args(parse("--decode", "--decode-policy", "h2o", "--decode-budget", "256",
                                       "--decode-interval", "8", "--decode-intervals", "32", "--window", "4",
                                       "--selection", "shared"))  # a grid axis: dropped, as for the uniform policy
    assert plan.evicting == {k: Decoding(H2O(budget=256, score="obc-joint", window=4), capacity=256, interval=k)
                             for k in (8, 32)}


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
    # AdaKV conserves budget x heads per layer; the paged pool adds only its partly filled last blocks (under 4
    # slots per head on this tiny model, 32 kept per head on average)
    assert 0 <= row["caches"]["mode"]["bytes_error"] < 4 / 32
    assert {t["key"] for t in report["targets"]} == set(TARGETS) - {"peak_memory", "mode_peak_memory"}
    assert "| measure | full cache | snapkv/obc-joint | adakv(snapkv) |" in capsys.readouterr().out


def test_decode_bench_runs_end_to_end_on_a_tiny_random_model(tmp_path, capsys):
    out = tmp_path / "decode.json"
    report = run(parse("--decode", "--random-weights", "tiny", "--decode-context", "64", "--decode-tokens", "24",
                       "--decode-timed", "8", "--decode-budget", "32", "--decode-interval", "4",
                       "--decode-intervals", "1", "8", "--decode-rounds", "1", "--threads", "1", "--out", str(out)))
    entry = json.loads(out.read_text())["decoding"]
    assert entry == report["decoding"] and "lengths" not in report
    assert set(entry["decode"]) == {"full", "evicting 1", "static 1", "evicting 4", "static 4", "evicting 8", "static 8"}
    generation = entry["generation"]
    token_bytes = 2 * 2 * 2 * 16 * 4  # layers x KV heads x (K, V) x d x float32
    assert generation["token_bytes"] == token_bytes and generation["seen_tokens"] == 64 + 24
    assert generation["cache_bytes"] == 32 * token_bytes and generation["bytes_error"] == 0  # 24 steps: 6 evictions
    assert len(generation["step_seconds"]) == 24 and max(generation["slots"]) == 35 and generation["slots"][0] == 32
    for k in (1, 4, 8):  # the static cache attends over the same slots as the evicting one, and never evicts
        assert entry["decode"][f"evicting {k}"]["slots"] == entry["decode"][f"static {k}"]["slots"] == [32, 31 + k]
        assert entry["decode"][f"evicting {k}"]["eviction_seconds"] > 0 == entry["decode"][f"static {k}"]["eviction_seconds"]
    assert entry["decode"]["full"]["slots"] == [64 + 24 - 8, 64 + 24 - 1]
    assert [t["key"] for t in report["targets"]] == list(DECODE_TARGETS) and report["targets"][0]["passed"]
    text = capsys.readouterr().out
    assert "| measure | evicting every 4 | static 32 cache | full cache |" in text
    assert "targets (at the longest length)" not in text and "targets (decode-time eviction):" in text


def test_memory_worker_runs_a_policy_spec_in_a_fresh_process():
    plan = plan_from_args(parse("--budget", "0.5", "--budgets", "0.5", "--lengths", "64"))
    config = {"length": 64, "model": None, "random_weights": "tiny", "attn": "sdpa", "dtype": None, "device": "cpu",
              "threads": 1, "policy": plan.specs["mode"]}
    result = run_memory_worker(config)
    full = 2 * 2 * 64 * 16 * 4 * 2  # layers x (K, V) x tokens x d x float32 x KV heads
    assert full // 2 <= result["cache_bytes"] < full // 2 * (1 + 4 / 32)  # + partly filled last blocks
    assert result["peak_bytes"] > 0 and result["eviction_seconds"] > 0


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
    assert "  [PASS] adakv(snapkv) cache bytes error at budget 0.1: -0.20% (target within +/- 3.00%)" in text


# ---------------------------------------------------------------- decode-time eviction: targets and report, synthetic


def synthetic_decoding(*, evicting: float = 24.0, static: float = 25.0, full: float = 12.0, held: int = 512) -> dict:
    """A `bench --decode` report: SmolLM2-shaped bytes (30 layers x 3 KV heads x 64 x K, V x float32), round tok/s."""
    token_bytes = 30 * 3 * 64 * 2 * 4

    def config(tps, slots, bytes_held, eviction=0.0):
        return {"tokens_per_second": tps, "rounds": [tps, tps * 0.9], "median_step_seconds": 0.9 / tps,
                "max_step_seconds": 3 / tps, "eviction_seconds": eviction, "slots": slots,
                "cache_bytes": bytes_held * token_bytes}

    decode = {"full": config(full, [3584, 4095], 4096)}
    for k, overhead in ((1, 0.5), (16, 1.0), (64, 1.0)):
        decode[f"evicting {k}"] = config(evicting * overhead if k == 1 else evicting, [512, 511 + k], 512, 0.256 / k)
        decode[f"static {k}"] = config(static, [512, 511 + k], 511 + k)
    generation = {"prefill_seconds": 4.0, "prefill_eviction_seconds": 0.05, "step_seconds": [0.05] * 1536 + [0.04] * 512,
                  "slots": [512 + i % 16 for i in range(2048)] + [held], "decode_eviction_seconds": 1.024,
                  "cache_bytes": held * token_bytes, "token_bytes": token_bytes, "seen_tokens": 4096,
                  "expected_bytes": 512 * token_bytes, "bytes_error": held / 512 - 1}
    entry = {"policy": "snapkv/obc-joint", "budget": 512, "interval": 16, "intervals": [1, 16, 64], "context": 2048,
             "new_tokens": 2048, "timed": 512, "rounds": 2, "generation": generation, "decode": decode}
    report = {"machine": {"torch_threads": 2}, "model": "m", "device": "cpu", "dtype": "torch.float32", "attn": "sdpa",
              "decoding": entry}
    report["targets"] = check_targets(report)
    return report


def test_decode_targets_all_pass_on_a_good_run():
    report = synthetic_decoding()
    assert passed(report) == dict.fromkeys(DECODE_TARGETS, True)
    values = {t["key"]: t["value"] for t in report["targets"]}
    assert values == {"decode_cache_bytes": 0.0, "decode_vs_static": 24 / 25, "decode_vs_full": 2.0}


@pytest.mark.parametrize("change, key, ok", [
    ({"held": 517}, "decode_cache_bytes", True),  # +0.98%
    ({"held": 518}, "decode_cache_bytes", False),  # +1.17%
    ({"held": 507}, "decode_cache_bytes", True),
    ({"held": 506}, "decode_cache_bytes", False),
    ({"evicting": 21.25}, "decode_vs_static", True),  # exactly 0.85x
    ({"evicting": 21.2}, "decode_vs_static", False),
    ({"evicting": 23.9}, "decode_vs_full", False),  # 1.99x the full cache
    ({"full": 12.5}, "decode_vs_full", False),
    ({"static": 40.0}, "decode_vs_static", False),
])
def test_each_decode_target_passes_or_misses_at_its_limit(change, key, ok):
    assert passed(synthetic_decoding(**change))[key] is ok


def test_decode_targets_judge_the_main_interval_only():
    report = synthetic_decoding()
    report["decoding"]["decode"]["evicting 1"]["tokens_per_second"] = 1.0  # interval 1: far too slow, only reported
    assert passed(report | {"targets": check_targets(report)}) == dict.fromkeys(DECODE_TARGETS, True)


def test_report_prints_the_decode_section_side_by_side_with_ratios_and_pass_miss():
    text = format_report(synthetic_decoding(evicting=20.0, held=527))
    assert "| measure |" in text and "| 2048 |" not in text and "targets (at the longest length)" not in text
    assert "decode-time eviction: snapkv/obc-joint, budget 512 tokens per KV head, interval 16; 2048-token prompt" in text
    assert "| measure | evicting every 16 | static 512 cache | full cache |" in text
    assert "| decode tok/s, last 512 tokens (x static, x full) | 20.0 (0.80x, 1.67x) | 25.0 (1.00x, 2.08x) | 12.0 (0.48x, 1.00x) |" in text
    assert "| ms per token (+ vs static) | 50.0 (+10.0) | 40.0 (+0.0) | 83.3 (+43.3) |" in text
    assert "| slots per KV head before each timed step (min-max) | 512-527 | 512-527 | 3584-4095 |" in text
    assert "| K/V cache MiB after the last step (x 512 tokens) | 22.5 (1.000x) | 23.2 (1.029x) | 180.0 (8.000x) |" in text
    assert "| eviction inside the hooks, ms per token | 0.03 | 0.00 | - |" in text
    assert "| interval | ms per token, evicting | ms per token, static |" in text
    assert "| 1 | 100.0 | 40.0 | +60.00 (2.50x) | 0.50 | 512-512 |" in text
    assert "| 64 | 50.0 | 40.0 | +10.00 (1.25x) | 0.01 | 512-575 |" in text
    assert ("generation: 2048 tokens in 97.3 s (21.1 tok/s; last 512: 25.0 tok/s) after a 4.00 s prefill; "
            "cache after it 23.2 MiB = 527 tokens' worth (+2.93% vs 512), between steps at most 527 slots") in text
    assert "targets (decode-time eviction):" in text
    assert "  [MISS] snapkv/obc-joint evicting to 512 every 16: cache bytes after 2048 tokens / 512 tokens' worth: 2.93% (target within +/- 1.00%)" in text
    assert "  [MISS] snapkv/obc-joint evicting to 512 every 16: decode, last 512 tokens / static 512 cache: 0.800x (target >= 0.850x)" in text
    assert "[PASS]" not in text


def test_report_with_both_suites_prints_both_target_blocks():
    report = synthetic_report() | {"decoding": synthetic_decoding()["decoding"]}
    report["targets"] = check_targets(report)
    assert {t["key"] for t in report["targets"]} == set(TARGETS) | set(DECODE_TARGETS)
    text = format_report(report)
    assert text.index("| measure | 2048 | 8192 |") < text.index("decode-time eviction:") < text.index(
        "targets (at the longest length):") < text.index("targets (decode-time eviction):")


def synthetic_reconstruction(full: float = 4.0, cheap: float = 2.6, plain: float = 2.0) -> dict:
    """A `bench --reconstruction` report: seconds per configuration at two lengths (targets judge the longest)."""
    entry = {"policies": {"full": "kvzip", "cheap": "kvzip-heads",
                          "replay": "kvzip-replay[stride=4]"}, "rounds": 3,
             "lengths": [{"length": 1024, "seconds": {"plain": 1.0, "full": 9.0, "cheap": 9.0, "replay": 9.0}},
                         {"length": 2048, "seconds": {"plain": plain, "full": full, "cheap": cheap, "replay": 5.0}}],
             "calibration_seconds": {"cheap": 12.5}}
    report = {"model": "m", "device": "cpu", "dtype": "torch.float32", "attn": "sdpa",
              "machine": {"torch_threads": 2, "oversubscription": [1.0, 1.0]}, "reconstruction": entry}
    return report | {"targets": check_targets(report)}


@pytest.mark.parametrize("change, key, ok", [
    ({}, "reconstruction_full", True),  # exactly 2x
    ({"full": 4.1}, "reconstruction_full", False),
    ({}, "reconstruction_cheap", True),  # exactly 1.3x
    ({"cheap": 2.7}, "reconstruction_cheap", False),
    ({"plain": 1.0}, "reconstruction_full", False),
])
def test_each_reconstruction_target_passes_or_misses_at_its_limit(change, key, ok):
    assert passed(synthetic_reconstruction(**change))[key] is ok


def test_report_prints_the_reconstruction_ratios_per_length():
    text = format_report(synthetic_reconstruction(full=5.0))
    assert "| tokens | plain | full | cheap | replay |" in text
    assert "| 1024 | 1.00 s (1.00x) | 9.00 s (9.00x) | 9.00 s (9.00x) | 9.00 s (9.00x) |" in text
    assert "| 2048 | 2.00 s (1.00x) | 5.00 s (2.50x) | 2.60 s (1.30x) | 5.00 s (2.50x) |" in text
    assert "[MISS] kvzip: compressing prefill / plain prefill: 2.500x (target <= 2.000x)" in text
    assert "[PASS] kvzip-heads" in text
    assert "replay" not in {t["key"].split("_")[-1] for t in synthetic_reconstruction()["targets"]}  # no target
    assert "cheap: rating the heads took 12.50 s, once per model (not in the ratios)" in text


def test_reconstruction_bench_rejects_random_weights_before_loading(no_model_loading):
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    register(commands)
    args = parser.parse_args(["bench", "--reconstruction", "--random-weights", "tiny"])
    with pytest.raises(ValueError, match="needs a real model"):
        run(args)
