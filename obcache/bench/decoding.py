"""Decode-time eviction (`obcache bench --decode`): a long greedy generation under `obcache.Decoding`, timed per step.

One **generation**: the prompt (`context` tokens) is prefilled under
`Decoding(policy, capacity, interval)`, whose wrapped policy evicts it to the
same `budget` tokens per KV head; then `new_tokens` greedy steps by hand, one
token per forward, each timed. Recorded: K/V bytes after the last step (vs
`budget` tokens' worth), slots per KV head before every step and after the
last, the eviction seconds the hooks count, and after the prompt and every
step the K/V bytes held (`cache.kv_nbytes()`: a paged layer's whole pool, free
blocks included) and the paged layers' pool blocks: the pool must stop
growing once the first evictions have freed blocks for later appends to reuse
(`report.POOL_WARMUP_INTERVALS` intervals).

Then `rounds` **rounds** time the last `timed` steps again, each configuration
on a fresh copy of its cache, after one untimed warm-up step, the
configurations interleaved burst by burst (`interval` steps of the evicting
and full caches, which continue, then K of each static one): a drift of the
machine's speed falls on all of them alike.

- `evicting K`: the generation's cache as it was `timed` steps before the
  end, under `Decoding(..., interval=K)`, for every K of `intervals`;
- `static K`: a cache evicted once to `budget` (the wrapped policy on a prompt
  of `context + new_tokens - timed` tokens) and never again, under
  `obcache.attach`. It decodes in bursts of K steps, each from a fresh copy
  (copies untimed), so it holds budget .. budget + K - 1 slots, as the
  evicting cache does: the difference is the eviction work alone;
- `full`: the model's own `DynamicCache` holding `context + new_tokens - timed`
  tokens (a plain prefill), decoded `timed` steps: the full cache at the same
  length.

Each configuration's tokens/s is the best round's.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from obcache.bench.measure import slot_bytes, sync
from obcache.bench.shapes import forward, prompt
from obcache.cache import EvictableCache
from obcache.hooks import attach
from obcache.policies import Decoding, Selector


@dataclass
class DecodePlan:
    """What `measure_decoding` runs (built and checked by `cli.decode_plan_from_args` before any model load).

    policy: the wrapped policy at `budget` tokens (evicts the prompt; alone, the static cache).
    evicting: interval -> Decoding(policy, capacity, interval), for the main `interval` and every sweep interval.
    label: "policy/score", as the report names it.
    """

    policy: Selector
    evicting: dict[int, Decoding]
    label: str
    budget: int
    interval: int
    context: int
    new_tokens: int
    timed: int
    rounds: int

    @property
    def full_length(self) -> int:
        """Tokens the full and the static caches hold before their timed steps."""
        return self.context + self.new_tokens - self.timed


def held(cache) -> float:
    """Slots per KV head: the mean over heads, the most over layers (an EvictableCache), or the tokens held."""
    if isinstance(cache, EvictableCache):
        return max(cache.kept_tokens())
    return float(cache.get_seq_length())


def kv_bytes(cache) -> int:
    """K/V bytes held by any transformers cache."""
    if isinstance(cache, EvictableCache):
        return cache.kv_nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def pool_blocks(cache: EvictableCache) -> int:
    """Blocks in the pools of the cache's paged layers (0 when every layer is uniform)."""
    return sum(len(layer.owner) for index, layer in enumerate(cache.layers) if cache.is_ragged(index))


def token_bytes(cache: EvictableCache) -> int:
    """K/V bytes of one token in every KV head of every layer (of every row)."""
    return sum(cache.head_lengths(i).numel() * slot_bytes(layer) for i, layer in enumerate(cache.layers))


@torch.no_grad()
def greedy_steps(
    model: nn.Module, cache, token: torch.Tensor, steps: int, device: torch.device,
    slots: list[float] | None = None, pool: dict[str, list[int]] | None = None,
) -> tuple[list[float], torch.Tensor]:
    """`steps` greedy forwards of one token on `cache`: the seconds of each, and the next token.

    With `slots`, appends the slots per KV head before each step (outside the timing): the step attends over
    them and its own token. With `pool`, appends the K/V bytes held and the pool blocks after each step.
    """
    seconds = []
    for _ in range(steps):
        if slots is not None:
            slots.append(held(cache))
        sync(device)
        start = time.perf_counter()
        token = forward(model, cache, token).argmax(-1, keepdim=True)
        sync(device)
        seconds.append(time.perf_counter() - start)
        if pool is not None:
            pool["bytes"].append(cache.kv_nbytes())
            pool["blocks"].append(pool_blocks(cache))
    return seconds, token


@torch.no_grad()
def generation(
    model: nn.Module, ids: torch.Tensor, plan: DecodePlan, device: torch.device
) -> tuple[dict, EvictableCache, torch.Tensor]:
    """The generation under Decoding at the main interval: its record, and (a copy of its cache, the token) as
    they were `plan.timed` steps before the end."""
    policy = plan.evicting[plan.interval]
    cache, slots = EvictableCache(), []
    with policy.attach(model):
        sync(device)
        start = time.perf_counter()
        token = forward(model, cache, ids).argmax(-1, keepdim=True)
        sync(device)
        prefill_seconds, prefill_eviction = time.perf_counter() - start, cache.eviction_seconds
        pool = {"bytes": [cache.kv_nbytes()], "blocks": [pool_blocks(cache)]}  # after the prompt, then every step
        seconds, token = greedy_steps(model, cache, token, plan.new_tokens - plan.timed, device, slots, pool)
        snapshot, snapshot_token = copy.deepcopy(cache), token
        last, token = greedy_steps(model, cache, token, plan.timed, device, slots, pool)
    slots.append(held(cache))
    record = {
        "prefill_seconds": prefill_seconds, "prefill_eviction_seconds": prefill_eviction,
        "step_seconds": seconds + last, "slots": slots,
        "decode_eviction_seconds": cache.eviction_seconds - prefill_eviction,
        "cache_bytes": cache.kv_nbytes(), "token_bytes": token_bytes(cache), "seen_tokens": cache.seen_tokens,
        "layout": "paged" if cache.is_ragged(0) else "uniform", "pool": pool,
    }
    record["expected_bytes"] = plan.budget * record["token_bytes"]
    record["bytes_error"] = record["cache_bytes"] / record["expected_bytes"] - 1
    return record, snapshot, snapshot_token


@dataclass
class Timed:
    """A timed configuration: `new_cache()` a fresh copy of its cache, `context()` what it decodes in, and its
    bursts: `burst` steps each, on a fresh cache each time if `fresh` (a static cache), else continuing one."""

    new_cache: Callable[[], object]
    context: Callable[[], AbstractContextManager]
    burst: int
    fresh: bool = False


@torch.no_grad()
def time_round(model: nn.Module, configs: dict[str, Timed], token: torch.Tensor, steps: int,
               device: torch.device) -> dict[str, dict]:
    """One round: every configuration's warm-up step, then `steps` timed steps of each, interleaved burst by
    burst (the configuration with the fewest steps done goes next), so that the machine's drifts fall on all
    alike. Per configuration: seconds of every step, slots before each, eviction seconds, bytes at the end."""
    for config in configs.values():
        with config.context():
            greedy_steps(model, config.new_cache(), token, 1, device)
    results = {key: {"step_seconds": [], "slots": [], "eviction_seconds": 0.0} for key in configs}
    caches = {key: (config.new_cache(), token) for key, config in configs.items()}
    while pending := [key for key in configs if len(results[key]["step_seconds"]) < steps]:
        key = min(pending, key=lambda k: len(results[k]["step_seconds"]))
        config, result = configs[key], results[key]
        cache, next_token = caches[key]
        if config.fresh and result["step_seconds"]:
            cache, next_token = config.new_cache(), token
        before, count = getattr(cache, "eviction_seconds", 0.0), min(config.burst, steps - len(result["step_seconds"]))
        with config.context():
            part, next_token = greedy_steps(model, cache, next_token, count, device, result["slots"])
        result["eviction_seconds"] += getattr(cache, "eviction_seconds", 0.0) - before
        result["step_seconds"] += part
        caches[key] = cache, next_token
    for key, result in results.items():
        result["seconds"], result["cache_bytes"] = sum(result["step_seconds"]), kv_bytes(caches[key][0])
    return results


@torch.no_grad()
def measure_decoding(model: nn.Module, plan: DecodePlan, device: torch.device) -> dict:
    """The whole decode-time eviction measurement (the report's `decoding` entry)."""
    ids = prompt(plan.full_length, model.config.vocab_size, device)
    record, snapshot, token = generation(model, ids[:, : plan.context], plan, device)
    full = DynamicCache(config=model.config)
    forward(model, full, ids)
    static = EvictableCache()
    with plan.policy.attach(model):
        forward(model, static, ids)
    configs = {"full": Timed(lambda: copy.deepcopy(full), nullcontext, plan.interval)}
    for interval, policy in plan.evicting.items():
        configs[f"evicting {interval}"] = Timed(lambda: copy.deepcopy(snapshot), lambda p=policy: p.attach(model),
                                                plan.interval)
        configs[f"static {interval}"] = Timed(lambda: copy.deepcopy(static), lambda: attach(model), interval,
                                              fresh=True)
    rounds: dict[str, list[dict]] = {key: [] for key in configs}
    for _ in range(plan.rounds):
        for key, result in time_round(model, configs, token, plan.timed, device).items():
            rounds[key].append(result)
    decode = {}
    for key, results in rounds.items():
        best = min(results, key=lambda r: r["seconds"])
        decode[key] = {
            "tokens_per_second": plan.timed / best["seconds"], "rounds": [plan.timed / r["seconds"] for r in results],
            "median_step_seconds": statistics.median(best["step_seconds"]), "max_step_seconds": max(best["step_seconds"]),
            "eviction_seconds": best["eviction_seconds"], "slots": [min(best["slots"]), max(best["slots"])],
            "cache_bytes": best["cache_bytes"],
        }
    return {
        "policy": plan.label, "budget": plan.budget, "interval": plan.interval, "intervals": sorted(plan.evicting),
        "context": plan.context, "new_tokens": plan.new_tokens, "timed": plan.timed, "rounds": plan.rounds,
        "generation": record, "decode": decode,
    }
