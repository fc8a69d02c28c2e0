"""One prefill, many policies.

Eviction happens after each layer's attention forward, so the prefill's own
outputs never depend on the policy. One hooked prefill on a full
`EvictableCache` therefore serves any number of policies: after each
attention module, every policy's `select(state)` sees the same `LayerState`
that `policy.attach(model)` would give it (the same hooks), and its per-layer
keep masks are recorded. `SharedPrefill.evicted(key)` then builds that
policy's evicted cache with `EvictableCache.subset`, exactly as
`obcache.generate` would have left it; run the model on it under
`obcache.attach(model)`. Policies that choose after all layers (KVzip, any
policy under GlobalKV) choose once the prefill is done; the KVzip ones share
one context reconstruction per chunk size.

    shared = shared_prefill(model, ids, {"full": None, "snap": SnapKV(budget=0.1)})
    cache = shared.evicted("snap")   # a fresh cache; shared.cache stays full
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from obcache.cache import EvictableCache
from obcache.calibration import calibrate
from obcache.generation import forward_tokens
from obcache.hooks import EvictionHooks
from obcache.layer_state import LayerState, Selector
from obcache.policies import Policy
from obcache.reconstruction import select_after_prefill


@dataclass
class SharedPrefill:
    """A full prefill and every policy's choice on it.

    cache: the full cache (never modified by `evicted`).
    logits: [1, V] next-token logits of the prefill (policy-independent).
    masks: per key, per layer, the keep mask [1, Hkv, L] (None = all).
    select_seconds: per key, time spent scoring and selecting over all layers.
    """

    cache: EvictableCache
    logits: torch.Tensor
    masks: dict[Hashable, list[torch.Tensor | None]]
    select_seconds: dict[Hashable, float]
    prefill_seconds: float

    def evicted(self, key: Hashable) -> EvictableCache:
        """A new cache holding what the policy of `key` keeps (all tokens for a None policy)."""
        return self.cache.subset(self.masks[key])


class _Recorder(EvictionHooks):
    """Records every policy's keep masks per layer at prefill; evicts nothing."""

    def __init__(self, model: nn.Module, policies: Mapping[Hashable, Selector | None]):
        super().__init__(model)
        self.policies = {key: policy for key, policy in policies.items() if policy is not None}
        self.masks: dict[Hashable, list[torch.Tensor | None]] = {key: [None] * len(self.attentions) for key in policies}
        self.seconds = dict.fromkeys(policies, 0.0)  # per policy: its scoring and choice, as if alone
        self.own_seconds = 0.0  # time really spent in the hooks (shared scoring counted once)

        self.prefill_scores: dict[Hashable, list[torch.Tensor]] = {
            key: [] for key, policy in self.policies.items() if policy.selects_after_all_layers
        }

    def wants_state(self, prefill: bool) -> bool:
        return prefill

    def layer_done(self, layer_idx: int, state: LayerState, cache: EvictableCache, prefill: bool) -> None:
        # token scores of this layer, computed once for the policies that score alike (each is charged their time)
        computed: dict[tuple, tuple[torch.Tensor, float]] = {}
        begin = time.perf_counter()
        for key, policy in self.policies.items():
            if policy.needs_reconstruction:  # scored after the prefill
                continue
            start = time.perf_counter()
            deferred = key in self.prefill_scores
            scores, shared = None, 0.0
            if deferred or type(policy).select is Policy.select:  # not Decoding, whose select keeps state
                scoring = policy.scoring()
                if scoring in computed:
                    scores, shared = computed[scoring]
                else:
                    scores = policy.token_scores(state)
                    computed[scoring] = scores, time.perf_counter() - start
            if deferred:
                self.prefill_scores[key].append(scores)
            else:
                self.masks[key][layer_idx] = policy.select(state, scores) if scores is not None else policy.select(state)
            self.seconds[key] += time.perf_counter() - start + shared
        self.own_seconds += time.perf_counter() - begin


@torch.no_grad()
def shared_prefill(model: nn.Module, ids: list[int], policies: Mapping[Hashable, Selector | None], *,
                   tokenizer=None, chat_template: bool = True) -> SharedPrefill:
    """Prefill `ids` (batch 1) once with the full cache and record each policy's keep masks.

    A None policy keeps everything. Every policy's `check_prompt` runs before the forward.
    `tokenizer` (and `chat_template`) write the reconstruction prompt of KVzip policies.
    `select_seconds` of a KVzip policy includes the reconstruction forwards (shared by all of them, counted in
    full for each: what it costs alone) and its own scoring.
    """
    recorder = _Recorder(model, policies)
    for policy in recorder.policies.values():
        calibrate(model, tokenizer, policy, chat_template=chat_template)  # once per model, for head-level KVzip
        policy.check_prompt([len(ids)])
    cache = EvictableCache(config=model.config)
    with recorder:
        start = time.perf_counter()
        logits = forward_tokens(model, cache, ids)
        elapsed = time.perf_counter() - start - recorder.own_seconds
        deferred = {key: recorder.policies[key] for key in recorder.prefill_scores}
        if deferred:
            chosen, seconds = select_after_prefill(model, cache, ids, deferred, recorder.prefill_scores,
                                                   tokenizer=tokenizer, chat_template=chat_template)
            for key, masks in chosen.items():
                recorder.masks[key] = masks
                recorder.seconds[key] += seconds[key]
    return SharedPrefill(cache, logits, recorder.masks, recorder.seconds, elapsed)
