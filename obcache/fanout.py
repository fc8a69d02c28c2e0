"""One prefill, many policies.

Eviction happens after each layer's attention forward, so the prefill's own
outputs never depend on the policy. One prefill on a full `EvictableCache`
therefore serves any number of policies: a `MaskRecorder` observer hands every
policy's `select` the same `LayerState` that `policy.attach(model)` would give
it, and records its keep masks (policies that score alike share one
`token_scores`). `SharedPrefill.evicted(key)` then builds that policy's
evicted cache with `EvictableCache.subset`, exactly as `obcache.generate` would
have left it; run the model on it under `obcache.attach(model)`. Policies
that choose after all layers (KVzip, GlobalKV) choose once the prefill is done
(`obcache.after_prefill`); the KVzip ones share one context reconstruction.

    shared = shared_prefill(model, ids, {"full": None, "snap": SnapKV(budget=0.1)})
    cache = shared.evicted("snap")   # a fresh cache; shared.cache stays full
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
import torch
from torch import nn

from obcache.after_prefill import select_after_prefill
from obcache.cache import EvictableCache
from obcache.capture import Engine, Observer
from obcache.forward import ForwardRecord
from obcache.generation import forward_tokens
from obcache.hooks import attach
from obcache.layer_state import LayerState
from obcache.selector import Selector


@dataclass
class SharedPrefill:
    """A full prefill and every policy's choice on it.

    cache: the full cache (never modified by `evicted`).
    logits: [1, V] next-token logits of the prefill (policy-independent).
    masks: per key, per layer, the keep mask [1, Hkv, L] (None = all).
    select_seconds: per key, time spent scoring and selecting over all layers (as if alone).
    policies: per key, the policy as prepared for the model (None = full cache).
    """

    cache: EvictableCache
    logits: torch.Tensor
    masks: dict[Hashable, list[torch.Tensor | None]]
    select_seconds: dict[Hashable, float]
    prefill_seconds: float
    policies: dict[Hashable, Selector | None]

    def evicted(self, key: Hashable) -> EvictableCache:
        """A new cache holding what the policy of `key` keeps (all tokens for a None policy)."""
        return self.cache.subset(self.masks[key])


class MaskRecorder(Observer):
    """At the prefill, records every policy's keep masks per layer (and each one's time, as if alone); evicts
    nothing. Policies that choose after all layers choose when the prefill is done."""

    def __init__(self, policies: Mapping[Hashable, Selector | None], layers: int):
        self.policies = {key: policy for key, policy in policies.items() if policy is not None}
        self.masks: dict[Hashable, list[torch.Tensor | None]] = {key: [None] * layers for key in policies}
        self.seconds = dict.fromkeys(policies, 0.0)
        self.own_seconds = 0.0  # time really spent here (shared scoring counted once)
        self.prefill_scores: dict[Hashable, list[torch.Tensor]] = {
            key: [] for key, policy in self.policies.items() if policy.selects_after_all_layers
        }

    def before_prefill(self, prompt_lengths: list[int], record: ForwardRecord) -> None:
        for policy in self.policies.values():
            policy.check_prompt(prompt_lengths)

    def wants(self, record: ForwardRecord) -> bool:
        return record.prefill

    def layer_done(self, state: LayerState, record: ForwardRecord) -> None:
        computed: dict[Hashable, tuple[torch.Tensor, float]] = {}  # token scores of this layer, once per scoring
        device = state.keys.device
        begin = _now(device)
        for key, policy in self.policies.items():
            if policy.replay() is not None:  # scored by its replay, after the prefill
                continue
            start = _now(device)
            scoring = policy.scoring()
            fresh = scoring not in computed
            if fresh:
                computed[scoring] = policy.token_scores(state), 0.0
                computed[scoring] = computed[scoring][0], _now(device) - start
            scores, shared = computed[scoring]
            if key in self.prefill_scores:
                self.prefill_scores[key].append(scores)
            else:
                self.masks[key][state.layer_idx] = policy.select(state, scores)
            self.seconds[key] += _now(device) - start + (0.0 if fresh else shared)
        self.own_seconds += _now(device) - begin

    def forward_done(self, record: ForwardRecord, engine: Engine) -> None:
        if not record.prefill or not self.prefill_scores:
            return
        begin = time.perf_counter()
        deferred = {key: self.policies[key] for key in self.prefill_scores}
        ids = record.input_ids[0].tolist()
        chosen, seconds = select_after_prefill(engine, record.cache, ids, deferred, self.prefill_scores)
        for key, masks in chosen.items():
            self.masks[key] = masks
            self.seconds[key] += seconds[key]
        self.own_seconds += time.perf_counter() - begin


def _now(device: torch.device) -> float:
    """The clock, after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def shared_prefill(model: nn.Module, ids: list[int], policies: Mapping[Hashable, Selector | None], *,
                   tokenizer=None, chat_template: bool = True) -> SharedPrefill:
    """Prefill `ids` (batch 1) once with the full cache and record each policy's keep masks.

    A None policy keeps everything. Every policy is prepared for the model (`Selector.prepare`) and checks the
    prompt before the forward. `tokenizer` (and `chat_template`) write the prompts of KVzip policies.
    `select_seconds` of a KVzip policy includes the reconstruction forwards (shared by all of them, counted in
    full for each: what it costs alone) and its own scoring.
    """
    prepared = {key: policy.prepare(model, tokenizer, chat_template=chat_template) if policy is not None else None
                for key, policy in policies.items()}
    engine = attach(model, tokenizer=tokenizer, chat_template=chat_template)
    recorder = MaskRecorder(prepared, len(engine.attentions))
    cache = EvictableCache(config=model.config)
    with engine, engine.observing(recorder):
        start = time.perf_counter()
        logits = forward_tokens(model, cache, ids)
        elapsed = time.perf_counter() - start - recorder.own_seconds
    return SharedPrefill(cache, logits, recorder.masks, recorder.seconds, elapsed, prepared)
