"""The benchmark: its plan of policies, its capture through the library's hooks, targets and report.

Timings are never asserted here: the targets live in `obcache bench`'s output.
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from obcache import H2O, AdaKV, Decoding, PyramidKV, SnapKV, TOVA, recommended
from obcache.bench.cli import DEFAULT_LENGTHS, decode_plan_from_args, layout_plan_from_args, plan_from_args, register, run
from obcache.bench.layouts import as_plain, kept_bytes, repeated
from obcache.bench.measure import measure_eviction, recorded_prefill
from obcache.bench.memory import run_memory_worker
from obcache.bench.report import DECODE_TARGETS, LAYOUT_TARGETS, TARGETS, check_targets, format_report
from obcache.cache import EvictableCache
from obcache.compat import cache_argument
from obcache.fanout import shared_prefill
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


def test_layout_plan_compares_uniform_snapkv_with_the_recommended_paged_policy():
    plan = layout_plan_from_args(parse("--layouts"))
    assert plan.policies == {"uniform": SnapKV(budget=0.1, score="obc-key"), "paged": recommended(budget=0.1)}
    assert (plan.lengths, plan.batches, plan.steps, plan.rounds) == ([2048, 4096, 8192], [1, 4, 8], 24, 3)
    assert (plan.scale_shape, plan.scale_length, plan.scale_batch) == ("llama-3.1-8b-attention", 8192, 8)
    plan = layout_plan_from_args(parse("--layouts", "--lengths", "512", "--batches", "2", "--budget", "0.2", "--no-scale"))
    assert plan.policies["paged"] == recommended(budget=0.2) and plan.scale_shape is None and plan.batches == [2]
    decode = decode_plan_from_args(parse("--layouts", "--decode", "--decode-policy", "recommended"))
    assert decode.policy == recommended(budget=512) and decode.label == "adakv(snapkv[sinks=4,kernel=15]+chunk8)/obc-key"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps"),
    (["--rounds", "0"], "--rounds"),
    (["--batches", "1", "0"], "--batches"),
    (["--scale-batch", "0"], "--scale-batch"),
    (["--lengths", "12"], "window"),
    (["--scale-length", "12"], "window"),
    (["--decode-budget", "64"], "add --decode"),
])
def test_bad_layout_plans_fail_before_any_model_work(argv, message):
    with pytest.raises(ValueError, match=message):
        layout_plan_from_args(parse("--layouts", *argv))


def test_layouts_and_reconstruction_are_separate_benchmarks(no_model_loading):
    with pytest.raises(ValueError, match="separate"):
        run(parse("--layouts", "--reconstruction"))


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


def test_repeated_rows_evict_as_a_batch_prefill_of_the_same_prompt_does():
    """The layouts benchmark builds its batch-B caches from one batch-1 prefill: the same slots as a batch-B one."""
    model = tiny_model()
    ids = torch.randint(1, 500, (96,), generator=torch.Generator().manual_seed(3)).tolist()
    policies = {"uniform": SnapKV(budget=0.25, score="obc-key"), "paged": recommended(budget=0.25, kernel=3)}
    shared = shared_prefill(model, ids, policies)
    for key, policy in policies.items():
        built = repeated(shared.cache, shared.masks[key], 3)
        batch = EvictableCache()
        with policy.attach(model), torch.no_grad():
            model(input_ids=torch.tensor([ids] * 3), **cache_argument(model, batch), use_cache=True)
        assert built.nbytes() == batch.nbytes() and built.is_ragged(0) == batch.is_ragged(0) == (key == "paged")
        assert built.get_seq_length() == batch.get_seq_length() == 96
        for layer in range(2):
            for mine, theirs in zip(built.kept_positions(layer), batch.kept_positions(layer)):
                assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
        slot = 2 * 8 * 4  # K and V, 8 dims, float32
        assert kept_bytes(built) == sum(int(built.head_lengths(i).sum()) for i in range(2)) * slot
    plain = as_plain(shared.cache, model, 2)
    assert plain.get_seq_length() == 96 and plain.layers[0].keys.shape == (2, 2, 96, 8)


def test_layouts_bench_runs_end_to_end_with_decode_time_eviction(tmp_path, capsys):
    out = tmp_path / "layouts.json"
    report = run(parse("--layouts", "--random-weights", "tiny", "--lengths", "64", "--batches", "1", "2", "--steps", "2",
                       "--rounds", "2", "--budget", "0.5", "--scale-shape", "tiny", "--scale-length", "64",
                       "--scale-batch", "2", "--threads", "1", "--decode", "--decode-policy", "recommended",
                       "--decode-context", "64", "--decode-tokens", "24", "--decode-timed", "8", "--decode-budget", "32",
                       "--decode-interval", "4", "--decode-intervals", "4", "--decode-rounds", "1", "--out", str(out)))
    entry = json.loads(out.read_text())["layouts"]
    assert entry == report["layouts"] and [(c["context"], c["batch"]) for c in entry["cells"]] == [(64, 1), (64, 2)]
    for cell in entry["cells"]:
        assert set(cell["tokens_per_second"]) == {"full", "limit", "uniform", "paged"} and cell["kept"] == 32
        assert all(len(rounds) == 2 for rounds in cell["rounds"].values())
        assert cell["bytes"]["uniform"]["layout"] == "uniform" and cell["bytes"]["paged"]["layout"] == "paged"
        assert cell["bytes"]["uniform"]["bytes_error"] == 0 and 0 <= cell["bytes"]["paged"]["bytes_error"] < 4 / 32
    assert entry["cells"][1]["bytes"]["paged"]["cache_bytes"] == 2 * entry["cells"][0]["bytes"]["paged"]["cache_bytes"]
    scale = entry["scale"]
    assert set(scale["tokens_per_second"]) == {"limit", "uniform", "paged"} and scale["shape"]["layers"] == 2
    decoding = report["decoding"]
    assert decoding["generation"]["layout"] == "paged" and decoding["policy"].startswith("adakv(")
    pool = decoding["generation"]["pool"]
    assert len(pool["bytes"]) == len(pool["blocks"]) == 25 and min(pool["blocks"]) > 0
    keys = [t["key"] for t in report["targets"]]
    assert keys == ["paged_vs_limit", "paged_vs_uniform", "paged_bytes"] * 2 + ["scale_paged_vs_uniform", "paged_bytes"] \
        + list(DECODE_TARGETS)
    text = capsys.readouterr().out
    assert "| context, batch | full | limit (kept tokens) | uniform (x limit) | paged (x limit) | paged / uniform |" in text
    assert "targets (layouts vs the limit, every cell):" in text and "targets (decode-time eviction):" in text
    assert "paged layout, K/V bytes held: pool blocks (all layers):" in text


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
    held = (32 + 4) * token_bytes  # the budget, and room for the interval's appends: never grown
    assert generation["cache_bytes"] == held and generation["bytes_error"] == 4 / 32  # 24 steps: 6 evictions
    assert len(generation["step_seconds"]) == 24 and max(generation["slots"]) == 35 and generation["slots"][0] == 32
    for k in (1, 4, 8):  # the static cache attends over the same slots as the evicting one, and never evicts
        assert entry["decode"][f"evicting {k}"]["slots"] == entry["decode"][f"static {k}"]["slots"] == [32, 31 + k]
        assert entry["decode"][f"evicting {k}"]["eviction_seconds"] > 0 == entry["decode"][f"static {k}"]["eviction_seconds"]
    assert entry["decode"]["full"]["slots"] == [64 + 24 - 8, 64 + 24 - 1]
    assert [t["key"] for t in report["targets"]] == list(DECODE_TARGETS) == ["decode_vs_static", "decode_pool_growth"]
    assert generation["layout"] == "uniform" and report["targets"][1]["passed"]  # the storage stops growing
    assert generation["pool"]["blocks"] == [0] * 25 and generation["pool"]["bytes"] == [held] * 25
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
    ({"mode_decode": 11.6}, "mode_decode_vs_uniform", False),  # 0.967x the uniform cache
    ({"mode_decode": 11.7}, "mode_decode_vs_uniform", True),  # 0.975x
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
    assert "  [MISS] decode, adakv(snapkv) / snapkv/obc-joint at budget 0.1: 0.700x (target >= 0.970x)" in text
    assert "  [PASS] adakv(snapkv) eviction / prefill: 1.00% (target <= 3.00%)" in text
    assert "  [PASS] adakv(snapkv) cache bytes error at budget 0.1: -0.20% (target within +/- 3.00%)" in text


# ---------------------------------------------------------------- decode-time eviction: targets and report, synthetic


def synthetic_decoding(*, evicting: float = 24.0, static: float = 25.0, full: float = 12.0, held: int = 512,
                       late_peak: int = 560) -> dict:
    """A `bench --decode` report: SmolLM2-shaped bytes (30 layers x 3 KV heads x 64 x K, V x float32), round tok/s;
    a paged pool of 560 tokens' worth (35 blocks of 16 per head) from step 1 on, `late_peak` at step 1000."""
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
                  "expected_bytes": 512 * token_bytes, "bytes_error": held / 512 - 1, "layout": "paged"}
    tokens = [512] + [560] * 2048  # after the prompt (an exact pool), then after each step
    tokens[1000] = late_peak
    generation["pool"] = {"bytes": [n * token_bytes for n in tokens], "blocks": [n // 16 * 90 for n in tokens]}
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
    assert values == {"decode_vs_static": 24 / 25, "decode_pool_growth": 0.0}


@pytest.mark.parametrize("change, key, ok", [
    ({"evicting": 23.75}, "decode_vs_static", True),  # exactly 0.95x
    ({"evicting": 23.7}, "decode_vs_static", False),
    ({"static": 40.0}, "decode_vs_static", False),
    ({"full": 30.0}, "decode_vs_static", True),  # the full cache is only reported
    ({"late_peak": 576}, "decode_pool_growth", False),  # the pool grew at step 1000, long after the first evictions
    ({"late_peak": 544}, "decode_pool_growth", True),  # a smaller pool later is fine
])
def test_each_decode_target_passes_or_misses_at_its_limit(change, key, ok):
    assert passed(synthetic_decoding(**change))[key] is ok


def test_decode_targets_judge_the_main_interval_only():
    report = synthetic_decoding()
    report["decoding"]["decode"]["evicting 1"]["tokens_per_second"] = 1.0  # interval 1: far too slow, only reported
    assert passed(report | {"targets": check_targets(report)}) == dict.fromkeys(DECODE_TARGETS, True)


def test_report_prints_the_decode_section_side_by_side_with_ratios_and_pass_miss():
    text = format_report(synthetic_decoding(evicting=20.0, held=527, late_peak=576))
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
    assert ("paged layout, K/V bytes held: pool blocks (all layers): 2880 after the prompt, 3150 at most over steps "
            "1-64, 3240 at most over all 2048 steps, 3150 at the end; K/V bytes 22.5 MiB = 512 tokens' worth after the "
            "prompt, peak 24.6 MiB = 560 tokens' worth over steps 1-64, peak 25.3 MiB = 576 tokens' worth over steps "
            "65-2048 (+2.86%), 24.6 MiB = 560 tokens' worth at the end; last new peak at step 1000") in text
    assert "targets (decode-time eviction):" in text
    assert ("  [MISS] snapkv/obc-joint evicting to 512 every 16: decode, last 512 tokens / static 512 cache: 0.800x "
            "(target >= 0.950x)") in text
    assert ("  [MISS] snapkv/obc-joint evicting to 512 every 16: peak K/V bytes held over steps 65-2048 / peak over "
            "the prompt and steps 1-64, - 1: 2.86% (target <= 0.00%)") in text
    assert "[PASS]" not in text


def test_report_with_both_suites_prints_both_target_blocks():
    report = synthetic_report() | {"decoding": synthetic_decoding()["decoding"]}
    report["targets"] = check_targets(report)
    assert {t["key"] for t in report["targets"]} == set(TARGETS) | set(DECODE_TARGETS)
    text = format_report(report)
    assert text.index("| measure | 2048 | 8192 |") < text.index("decode-time eviction:") < text.index(
        "targets (at the longest length):") < text.index("targets (decode-time eviction):")


# ---------------------------------------------------------------- layouts vs the limit: targets and report, synthetic


def synthetic_layouts(*, paged: float = 29.0, uniform: float = 29.5, limit: float = 29.8, paged_error: float = 0.02,
                      scale_paged: float = 0.5) -> dict:
    """A `bench --layouts` report: two cells (2048 x 1 with the given tok/s, 8192 x 8 comfortably passing), SmolLM2
    bytes, and a scale cell (uniform 0.5 s per step)."""
    mib = 2**20

    def cell(context, batch, tps, error):
        rounds = {key: [value * 0.98, value, value * 1.01] for key, value in tps.items()}
        kept = round(0.1 * context)
        return {"context": context, "length": context + 30, "batch": batch, "kept": kept, "steps": 24,
                "tokens_per_second": tps, "rounds": rounds,
                "step_seconds": {key: batch / value for key, value in tps.items()},
                "bytes": {"uniform": {"layout": "uniform", "cache_bytes": 9.0 * mib, "index_bytes": 72 * 1024,
                                      "kept_bytes": 9.0 * mib, "bytes_error": 0.0, "head_tokens": [kept, kept],
                                      "mean_tokens": kept, "block_sizes": []},
                          "paged": {"layout": "paged", "cache_bytes": 9.0 * mib * (1 + error), "index_bytes": 216 * 1024,
                                    "kept_bytes": 9.0 * mib, "bytes_error": error, "head_tokens": [54, 462],
                                    "mean_tokens": kept, "block_sizes": [8]}}}

    scale = cell(8192, 8, {"limit": 8 / 0.45, "uniform": 8 / 0.5, "paged": 8 / scale_paged}, 0.001)
    scale |= {"step_seconds": {"limit": 0.45, "uniform": 0.5, "paged": scale_paged}, "shape_name": "llama-3.1-8b-attention",
              "shape": {"layers": 32, "query_heads": 32, "kv_heads": 8, "head_dim": 128, "hidden_size": 512,
                        "dtype": "torch.float32"}}
    entry = {"budget": 0.1, "steps": 24, "rounds": 3, "cells": [
        cell(2048, 1, {"full": 21.0, "limit": limit, "uniform": uniform, "paged": paged}, paged_error),
        cell(8192, 8, {"full": 40.0, "limit": 100.0, "uniform": 100.0, "paged": 99.0}, 0.01)],
        "policies": {"uniform": "snapkv/obc-key", "paged": "adakv(snapkv[sinks=4,kernel=15]+chunk8)/obc-key"},
        "scale": scale}
    report = {"machine": {"torch_threads": 2}, "model": "m", "device": "cpu", "dtype": "torch.float32", "attn": "sdpa",
              "layouts": entry}
    return report | {"targets": check_targets(report)}


def test_layout_targets_all_pass_on_a_good_run_in_every_cell():
    report = synthetic_layouts()
    assert {t["key"] for t in report["targets"]} == set(LAYOUT_TARGETS) and all(t["passed"] for t in report["targets"])
    assert [(t["key"], t["context"], t["batch"]) for t in report["targets"]][:3] == [
        ("paged_vs_limit", 2048, 1), ("paged_vs_uniform", 2048, 1), ("paged_bytes", 2048, 1)]
    assert len(report["targets"]) == 3 * 2 + 2


@pytest.mark.parametrize("change, key, ok", [
    ({"paged": 28.9, "uniform": 28.9}, "paged_vs_limit", False),  # 0.970x of 29.8 is 28.906
    ({"paged": 28.91, "uniform": 28.91}, "paged_vs_limit", True),
    ({"paged": 28.6, "uniform": 29.5, "limit": 20.0}, "paged_vs_uniform", False),  # 0.969x the uniform layout
    ({"paged": 28.7, "uniform": 29.5, "limit": 20.0}, "paged_vs_uniform", True),  # 0.973x
    ({"paged": 31.0}, "paged_vs_uniform", True),  # faster than uniform is fine
    ({"paged_error": 0.03}, "paged_bytes", True),
    ({"paged_error": 0.031}, "paged_bytes", False),
    ({"scale_paged": 0.55}, "scale_paged_vs_uniform", True),  # exactly 1.1x
    ({"scale_paged": 0.56}, "scale_paged_vs_uniform", False),
])
def test_each_layout_target_passes_or_misses_at_its_limit(change, key, ok):
    report = synthetic_layouts(**change)
    assert all(t["passed"] is ok for t in report["targets"] if t["key"] == key and t.get("context") != 8192
               or t["key"] == key == "scale_paged_vs_uniform")


def test_report_prints_the_layouts_against_the_limit_with_ratios_and_pass_miss():
    text = format_report(synthetic_layouts(paged=26.8))
    assert ("layouts vs the limit: decode tok/s over all rows (batch x steps / s), median of 3 interleaved rounds of 24 "
            "steps after a warm-up step, 2 torch threads; kept 0.1: limit = the model's own DynamicCache holding only "
            "the kept tokens; uniform = snapkv/obc-key; paged = adakv(snapkv[sinks=4,kernel=15]+chunk8)/obc-key") in text
    assert "| context, batch | full | limit (kept tokens) | uniform (x limit) | paged (x limit) | paged / uniform |" in text
    assert ("| 2048, 1 | 21.0 | 29.8 (205) | 29.5 (0.990x) | 26.8 (0.899x) | 0.908x | 29.2-30.1 / 28.9-29.8 / "
            "26.3-27.1 |") in text
    assert ("| 2048, 1 | 9.0 / 9.0 (+0.00%) | 9.2 / 9.0 (+2.00%) | 54-462 (mean 205), block 8 | 72.0 (0.78%) | "
            "216.0 (2.30%) |") in text
    assert "| 8192, 8 (scale) |" in text
    assert ("scale: random weights, llama-3.1-8b-attention (32 layers, 32 query and 8 KV heads of 128 dims, hidden "
            "size 512, torch.float32)") in text
    assert "| 8192, 8 | 450.0 (819) | 500.0 | 500.0 | 1.000x |" in text
    assert "targets (layouts vs the limit, every cell):" in text
    assert "  [MISS] 2048 tokens, batch 1: decode, paged / limit: 0.899x (target >= 0.970x)" in text
    assert "  [MISS] 2048 tokens, batch 1: decode, paged / uniform: 0.908x (target >= 0.970x)" in text
    assert "  [PASS] 2048 tokens, batch 1: paged K/V bytes / kept tokens' bytes - 1: 2.00% (target <= 3.00%)" in text
    assert ("  [PASS] scale (llama-3.1-8b-attention, 8192 tokens, batch 8): step time, paged / uniform: 1.000x "
            "(target <= 1.100x)") in text


def test_report_with_layouts_and_decoding_prints_both():
    report = synthetic_layouts() | {"decoding": synthetic_decoding()["decoding"]}
    report["targets"] = check_targets(report)
    assert {t["key"] for t in report["targets"]} == set(LAYOUT_TARGETS) | set(DECODE_TARGETS)
    text = format_report(report)
    assert text.index("layouts vs the limit:") < text.index("decode-time eviction:") < text.index(
        "targets (layouts vs the limit, every cell):") < text.index("targets (decode-time eviction):")


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
