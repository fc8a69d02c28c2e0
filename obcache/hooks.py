"""Attach a policy to a transformers model with forward hooks.

`PrefillHooks` finds each layer's prefill; `EvictionHooks` (what
`policy.attach(model)` returns) adds eviction. Hooks, removed on exit:

1. before the decoder's forward: give it an `EvictableCache` (replacing an
   empty `DynamicCache`), check the prompt (left padding only, long enough for
   the policy) before any work, and on later calls translate the logical 2-D
   attention mask to the shorter physical cache and fill in true positions;
2. after each attention module's prefill forward: rebuild the window queries,
   let the policy choose the kept tokens, and shrink that layer's cache at once
   (so the full cache of all layers never coexists with scoring temporaries).
   A pre-hook on the module's output projection (`o_proj`) hands the per-head
   attention outputs the model just computed to the scores, so `obc-key` /
   `obc-joint` need not recompute o_i = sum_p A_ip v_p.

Per decoding step the hooks cost a few dictionary look-ups (no signature
binding when the model is called with keyword arguments, as transformers does).
"""

from __future__ import annotations

import inspect
import time

import torch
from torch import nn
from transformers import DynamicCache

from obcache.cache import EvictableCache
from obcache.models import FamilyAdapter, attention_layers, check_attention_implementation, check_supported_config
from obcache.policies.base import LayerState, Policy


class PrefillHooks:
    """Hands each attention layer's state right after its prefill forward to `on_prefill`.

    A context manager: a post-hook on every attention module, and a pre-hook on
    its output projection that captures the per-head attention outputs the
    model just computed (so the scores need not recompute them).
    """

    def __init__(self, model: nn.Module):
        self.adapter = check_supported_config(model.config)
        check_attention_implementation(model)
        self.model = model
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.attentions = attention_layers(self.decoder)
        self._handles: list = []
        # Attention outputs (o_proj inputs [B, q, Hq * d]) of the current forward, per layer index;
        # each is dropped by the attention module's own post-hook right after.
        self._outputs: dict[int, torch.Tensor] = {}

    def on_prefill(self, layer_idx: int, state: LayerState, cache: EvictableCache) -> None:
        raise NotImplementedError

    def __enter__(self):
        for attention in self.attentions:
            self._handles.append(attention.register_forward_hook(self._after_attention, with_kwargs=True))
            projection = getattr(attention, self.adapter.output_projection or "", None)
            if projection is not None:
                self._handles.append(projection.register_forward_pre_hook(self._capture(attention.layer_idx)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _capture(self, layer_idx: int):
        outputs = self._outputs

        def hook(module, args):
            outputs[layer_idx] = args[0]

        return hook

    def _after_attention(self, module, args, kwargs, output):
        outputs = self._outputs.pop(module.layer_idx, None)
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, EvictableCache) or module.layer_idx in cache.evicted_layers:
            return  # decoding steps end here
        state = prefill_layer_state(self.adapter, module, args, kwargs, outputs=outputs)
        if state is not None:
            with torch.no_grad():
                self.on_prefill(module.layer_idx, state, cache)


class EvictionHooks(PrefillHooks):
    """Context manager returned by `policy.attach(model)`; safe to re-enter.

    Adds a pre-hook on the decoder (cache, prompt checks, masks, positions) and
    evicts each layer as soon as its prefill forward is done.
    """

    def __init__(self, model: nn.Module, policy: Policy):
        super().__init__(model)
        self.policy = policy
        self._signature = inspect.signature(self.decoder.forward)

    def __enter__(self) -> "EvictionHooks":
        self._handles.append(self.decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        return super().__enter__()

    def on_prefill(self, layer_idx: int, state: LayerState, cache: EvictableCache) -> None:
        start = time.perf_counter()
        indices = self.policy.select(state)
        if indices is None:
            cache.mark_kept_all(layer_idx)
        else:
            cache.keep(layer_idx, indices)
        cache.eviction_seconds += time.perf_counter() - start

    def _before_forward(self, module, args, kwargs):
        if args:  # positional arguments: name them (transformers itself passes keywords only)
            kwargs = dict(self._signature.bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
        else:
            kwargs = dict(kwargs)
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        query_length = inputs.shape[1]
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = self.model.config.use_cache
        if cache is None and not use_cache:
            return (), kwargs
        if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            cache = kwargs["past_key_values"] = EvictableCache(config=self.model.config)
        if not isinstance(cache, EvictableCache):
            raise TypeError(
                f"obcache needs an EvictableCache or an empty DynamicCache, got a filled {type(cache).__name__}"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError("obcache needs a 2-D attention mask (batch, tokens), not a prepared 4-D mask")
        if cache.seen_tokens == 0:
            cache.start(mask)
            lengths = mask.sum(-1).tolist() if mask is not None else [query_length] * inputs.shape[0]
            self.policy.check_prompt(lengths)
        else:
            kwargs["attention_mask"] = cache.attention_mask_for(mask, query_length)
            if kwargs.get("position_ids") is None:
                kwargs["position_ids"] = cache.positions_for(query_length, inputs.device)
        return (), kwargs


def prefill_layer_state(
    adapter: FamilyAdapter, module: nn.Module, args, kwargs, *, outputs: torch.Tensor | None = None
) -> LayerState | None:
    """The policy's view of an attention layer right after the forward that filled its cache.

    None if the cache is not an `EvictableCache`, was already evicted, or held
    tokens before this forward (only the prefill is evicted). `outputs`, if
    given, is the input of the module's output projection in that forward,
    [B, L, Hq * d] (per-head attention outputs, heads side by side); the state
    then serves them sliced per head instead of letting the scores recompute them.
    """
    cache = kwargs.get("past_key_values")
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    layer_idx = module.layer_idx
    if not isinstance(cache, EvictableCache) or layer_idx in cache.evicted_layers:
        return None
    layer_cache = cache.layers[layer_idx]
    if layer_cache.get_seq_length() != hidden.shape[1]:
        return None
    cos, sin = kwargs["position_embeddings"]

    query_heads = module.config.num_attention_heads

    def queries(first: int, last: int) -> torch.Tensor:
        return adapter.queries(module, hidden[:, first:last], cos[:, first:last], sin[:, first:last])

    window_outputs = None
    if outputs is not None and outputs.shape[:2] == hidden.shape[:2]:

        def window_outputs(first: int, last: int) -> torch.Tensor:
            # [B, W, Hq * dv] -> [B, Hq, W, dv]: the layout of the attention before its reshape (a view).
            rows = outputs[:, first:last]
            return rows.view(rows.shape[0], rows.shape[1], query_heads, -1).transpose(1, 2)

    return LayerState(
        keys=layer_cache.keys,
        values=layer_cache.values,
        scaling=module.scaling,
        query_heads=query_heads,
        key_mask=cache.prompt_mask,
        queries=queries,
        outputs=window_outputs,
    )
