"""Layouts vs the limit (`obcache bench --layouts`): decode speed of both cache layouts against a plain cache of
the kept length, and the bytes they hold.

For each context length and batch size, one **cell** decodes, in interleaved
rounds (round robin, the order rotated every round; each configuration's
tokens/s is the median over rounds):

- `full`: the model's own `DynamicCache` holding the whole prompt, no obcache;
- `limit`: the model's own `DynamicCache` holding only the kept number of
  tokens (a plain prefill of the prompt's last `kept` tokens, no obcache): the
  fastest any eviction at this budget can decode;
- `uniform`: `SnapKV(budget, score="obc-key")` under `policy.attach(model)`,
  every KV head the same count (the uniform layout);
- `paged`: `obcache.recommended(budget)` (AdaKV: heads of unequal length)
  under `policy.attach(model)` (the paged layout).

The prompt is a real needle context (`make_sample`, with its question;
pseudo-random ids on a random-weight model). One prefill at batch 1 records
both policies' keep masks (`fanout.shared_prefill`); the batch-B caches are
that prefill's rows repeated, each layer evicted with its mask as it is built
(the rows are the same prompt, so a batch-B prefill would keep the same
slots), and the plain caches are repeated the same way.

Each round, every configuration starts from the cache as it was after the
prompt (an obcache cache: a copy-on-write `fork`; a plain one: cropped back),
decodes one untimed warm-up step, then `steps` timed greedy steps; tokens/s
counts every row (batch x steps / seconds).

**Bytes** (per cell, right after eviction): `cache.kv_nbytes()` and
`cache.index_nbytes()` of both layouts against the kept tokens' bytes (the
real slots of every KV head, keys and values).

**Scale**: the same cell on a random-weight model with an 8B-shaped attention
(`--scale-shape`, default 32 layers, 32 query and 8 KV heads of 128 dims, a
small hidden size), at `--scale-length` and `--scale-batch`, without the
full cache (too large to hold at batch 8): per-step times of the paged and
the uniform layout, and the limit.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from obcache.bench.measure import slot_bytes, sync
from obcache.bench.shapes import forward, prompt
from obcache.cache import EvictableCache
from obcache.fanout import shared_prefill
from obcache.policies import Selector, SnapKV, policy_label, recommended

#: The configurations of a cell, in the order of the first round.
CONFIGS = ("full", "limit", "uniform", "paged")


def layout_policies(budget: float | int) -> dict[str, Selector]:
    """The two evicting configurations: the uniform layout's policy and the paged (head-adaptive) one's."""
    return {"uniform": SnapKV(budget=budget, score="obc-key"), "paged": recommended(budget=budget)}


@dataclass
class LayoutPlan:
    """What `measure_layouts` runs (built and checked by `cli.layout_plan_from_args` before any model load)."""

    budget: float | int
    lengths: list[int]
    batches: list[int]
    steps: int
    rounds: int
    scale_shape: str | None = None
    scale_length: int = 8192
    scale_batch: int = 8
    policies: dict[str, Selector] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.policies:
            self.policies = layout_policies(self.budget)


def needle_prompt(tokenizer, length: int) -> list[int]:
    """Token ids of a needle sample's context of `length` tokens and its question, as `obcache.generate` feeds
    them (chat template)."""
    from obcache.evaluation.tasks import make_sample
    from obcache.generation import build_prompt

    sample = make_sample("niah_single_number", tokenizer, length, seed=0, depth=0.5)
    context, question = build_prompt(tokenizer, sample.context, sample.question)
    return context + question


def plain_cache(model: nn.Module, ids: list[int], batch: int, device: torch.device) -> DynamicCache:
    """The model's own prefill of `ids` (batch 1, no obcache), its rows repeated to `batch`."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        forward(model, cache, torch.tensor([ids], device=device))
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    return cache


def as_plain(cache: EvictableCache, model: nn.Module, batch: int) -> DynamicCache:
    """A full (never evicted) obcache cache as the model's own `DynamicCache` of `batch` repeated rows."""
    plain = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        plain.update(layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1), index)
    return plain


def repeated(cache: EvictableCache, masks: list[torch.Tensor | None], batch: int) -> EvictableCache:
    """The cache a batch of `batch` copies of the (batch-1, full) `cache`'s prompt leaves after eviction with
    `masks` (each row's the same): built layer by layer, each layer evicted as soon as it is written, so the
    full batch-B cache never exists."""
    out = EvictableCache()
    first = cache.layers[0]
    out.begin_forward(None, batch, first.get_seq_length(), first.keys.device)
    for index, (layer, mask) in enumerate(zip(cache.layers, masks)):
        out.update(layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1), index)
        out.keep(index, None if mask is None else mask.expand(batch, -1, -1))
    return out


def kept_bytes(cache: EvictableCache) -> int:
    """Bytes of the keys and values of the real slots every KV head holds (what eviction kept)."""
    total = 0
    for index, layer in enumerate(cache.layers):
        total += int(cache.head_lengths(index).sum()) * slot_bytes(layer)
    return total


def bytes_entry(cache: EvictableCache) -> dict:
    """Bytes held by an evicted cache vs its kept tokens' bytes; its layout and tokens per KV head."""
    heads = torch.stack([cache.head_lengths(i) for i in range(len(cache.layers))])  # [layers, B, Hkv]
    kept = kept_bytes(cache)
    blocks = {getattr(layer, "block", None) for layer in cache.layers} - {None}
    return {
        "layout": "paged" if cache.is_ragged(0) else "uniform", "cache_bytes": cache.kv_nbytes(),
        "index_bytes": cache.index_nbytes(), "kept_bytes": kept, "bytes_error": cache.kv_nbytes() / kept - 1,
        "head_tokens": [int(heads.min()), int(heads.max())], "mean_tokens": float(heads.float().mean()),
        "block_sizes": sorted(blocks),
    }


class Config:
    """One timed configuration of a cell: a cache as it was after the prompt, and the context to decode it in.

    `fresh()` gives a cache to decode from (a fork of an obcache cache; a plain cache itself), `done(cache)`
    puts things back (a plain cache is cropped to its prompt)."""

    def __init__(self, cache, context: Callable[[], AbstractContextManager]):
        self.cache, self.context = cache, context
        self.length = cache.get_seq_length()

    def fresh(self):
        return self.cache.fork() if isinstance(self.cache, EvictableCache) else self.cache

    def done(self, cache) -> None:
        extra = cache.get_seq_length() - self.length
        if not isinstance(self.cache, EvictableCache) and extra:
            cache.crop(-extra)  # a negative count removes that many tokens (every release)


@torch.no_grad()
def decode_steps(model: nn.Module, config: Config, token: torch.Tensor, steps: int, device: torch.device) -> float:
    """One untimed warm-up step, then `steps` timed greedy steps from a fresh cache: their seconds."""
    cache = config.fresh()
    try:
        with config.context():
            current = forward(model, cache, token).argmax(-1, keepdim=True)
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                current = forward(model, cache, current).argmax(-1, keepdim=True)
            sync(device)
            return time.perf_counter() - start
    finally:
        config.done(cache)


def interleaved(model: nn.Module, configs: dict[str, Config], token: torch.Tensor, steps: int, rounds: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds of `steps` decoding steps per configuration and round: rounds in round robin, the order rotated
    every round (after one untimed pass of two steps each)."""
    keys = list(configs)
    for key in keys:
        decode_steps(model, configs[key], token, 2, device)
    seconds: dict[str, list[float]] = {key: [] for key in keys}
    for index in range(rounds):
        for key in keys[index % len(keys):] + keys[: index % len(keys)]:
            seconds[key].append(decode_steps(model, configs[key], token, steps, device))
    return seconds


@torch.no_grad()
def measure_cell(model: nn.Module, ids: list[int], batch: int, plan: LayoutPlan, device: torch.device, *,
                 full: bool = True) -> dict:
    """One context length and batch size: tokens/s of every configuration (median over rounds), and bytes."""
    shared = shared_prefill(model, ids, plan.policies)
    caches = {key: repeated(shared.cache, shared.masks[key], batch) for key in plan.policies}
    kept = round(caches["uniform"].kept_tokens()[0])
    token = shared.logits.argmax(-1, keepdim=True).expand(batch, -1)
    configs: dict[str, Config] = {}
    if full:
        configs["full"] = Config(as_plain(shared.cache, model, batch), nullcontext)
    del shared
    configs["limit"] = Config(plain_cache(model, ids[-kept:], batch, device), nullcontext)
    for key, policy in plan.policies.items():
        configs[key] = Config(caches[key], lambda p=policy: p.attach(model))
    seconds = interleaved(model, configs, token, plan.steps, plan.rounds, device)
    tokens = batch * plan.steps
    return {
        "length": len(ids), "batch": batch, "kept": kept, "steps": plan.steps,
        "tokens_per_second": {key: tokens / statistics.median(s) for key, s in seconds.items()},
        "step_seconds": {key: statistics.median(s) / plan.steps for key, s in seconds.items()},
        "rounds": {key: [tokens / x for x in s] for key, s in seconds.items()},
        "bytes": {key: bytes_entry(caches[key]) for key in plan.policies},
    }


def measure_layouts(model: nn.Module, prompts: Callable[[int], list[int]], plan: LayoutPlan,
                    device: torch.device, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Every cell of the default model (`prompts(length)`: the prompt's ids), largest batch last per length."""
    entry = {"budget": plan.budget, "steps": plan.steps, "rounds": plan.rounds,
             "policies": {key: f"{policy_label(p)}/{p.base.score}" for key, p in plan.policies.items()}, "cells": []}
    for length in plan.lengths:
        ids = prompts(length)
        for batch in plan.batches:
            progress(f"{length} tokens, batch {batch}")
            entry["cells"].append(measure_cell(model, ids, batch, plan, device) | {"context": length})
    return entry


def measure_scale(model: nn.Module, plan: LayoutPlan, device: torch.device) -> dict:
    """The scale cell: a random-weight model of `plan.scale_shape`, pseudo-random prompt, no full cache."""
    ids = prompt(plan.scale_length, model.config.vocab_size, device)[0].tolist()
    cell = measure_cell(model, ids, plan.scale_batch, plan, device, full=False)
    config = model.config
    shape = {"layers": config.num_hidden_layers, "query_heads": config.num_attention_heads,
             "kv_heads": config.num_key_value_heads, "head_dim": getattr(config, "head_dim", None)
             or config.hidden_size // config.num_attention_heads, "hidden_size": config.hidden_size,
             "dtype": str(model.dtype)}
    return cell | {"context": plan.scale_length, "shape_name": plan.scale_shape, "shape": shape}
