"""One prefill, many policies.

Eviction happens after each layer's attention forward, so the prefill's own
outputs never depend on the policy. One hooked prefill on a full
`EvictableCache` therefore serves any number of policies: after each
attention module, every policy's `select(state)` sees the same `LayerState`
that `policy.attach(model)` would give it (including the captured input of
the output projection, where the hooks pass it), and its per-layer indices are
recorded. `SharedPrefill.evicted(key)` then builds that policy's evicted cache
with `EvictableCache.subset`, exactly as `obcache.generate` would have left it.

    shared = shared_prefill(model, ids, {"full": None, "snap": SnapKV(budget=0.1)})
    cache = shared.evicted("snap")   # a fresh cache; shared.cache stays full
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from obcache.cache import EvictableCache
from obcache.generation import forward_tokens
from obcache.hooks import prefill_layer_state
from obcache.models import attention_layers, check_attention_implementation, check_supported_config
from obcache.policies.base import Policy

# The hooks hand the captured o_proj input to the scores when prefill_layer_state accepts it;
# so does the fan-out, to stay bit-identical with `policy.attach(model)`.
_PASSES_OUTPUTS = "outputs" in inspect.signature(prefill_layer_state).parameters


@dataclass
class SharedPrefill:
    """A full prefill and every policy's choice on it.

    cache: the full cache (never modified by `evicted`).
    logits: [1, V] next-token logits of the prefill (policy-independent).
    indices: per key, per layer, the kept positions [1, Hkv, kept] (None = all).
    select_seconds: per key, time spent scoring and selecting over all layers.
    """

    cache: EvictableCache
    logits: torch.Tensor
    indices: dict[Hashable, list[torch.Tensor | None]]
    select_seconds: dict[Hashable, float]
    prefill_seconds: float

    def evicted(self, key: Hashable) -> EvictableCache:
        """A new cache holding what the policy of `key` keeps (all tokens for a None policy)."""
        return self.cache.subset(self.indices[key])


@torch.no_grad()
def shared_prefill(model: nn.Module, ids: list[int], policies: Mapping[Hashable, Policy | None]) -> SharedPrefill:
    """Prefill `ids` (batch 1) once with the full cache and record each policy's kept indices.

    A None policy keeps everything. Every policy's `check_prompt` runs before the forward.
    """
    adapter = check_supported_config(model.config)
    check_attention_implementation(model)
    for policy in policies.values():
        if policy is not None:
            policy.check_prompt([len(ids)])
    layers = attention_layers(model)
    indices: dict[Hashable, list[torch.Tensor | None]] = {key: [None] * len(layers) for key in policies}
    seconds = dict.fromkeys(policies, 0.0)

    outputs: dict[int, torch.Tensor] = {}

    def capture(layer_idx: int):
        def hook(module, args):
            outputs[layer_idx] = args[0]

        return hook

    def after_attention(module, args, kwargs, output):
        captured = outputs.pop(module.layer_idx, None)
        extra = {"outputs": captured} if _PASSES_OUTPUTS else {}
        state = prefill_layer_state(adapter, module, args, kwargs, **extra)
        if state is None:
            return
        for key, policy in policies.items():
            if policy is not None:
                start = time.perf_counter()
                indices[key][module.layer_idx] = policy.select(state)
                seconds[key] += time.perf_counter() - start

    cache = EvictableCache(config=model.config)
    handles = [layer.register_forward_hook(after_attention, with_kwargs=True) for layer in layers]
    projection = getattr(adapter, "output_projection", None) if _PASSES_OUTPUTS else None
    if projection is not None:
        handles += [getattr(layer, projection).register_forward_pre_hook(capture(layer.layer_idx)) for layer in layers]
    try:
        start = time.perf_counter()
        logits = forward_tokens(model, cache, ids)
        elapsed = time.perf_counter() - start - sum(seconds.values())
    finally:
        for handle in handles:
            handle.remove()
    return SharedPrefill(cache, logits, indices, seconds, elapsed)
