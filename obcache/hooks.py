"""Attach obcache to a transformers model with forward hooks.

`LayerHooks` is the one capture path: after every attention module's forward
it hands the layer's `LayerState` (cached keys/values, the forward's queries
rebuilt on demand, the attention outputs it computed) to `layer_done`. Eviction,
the evaluation's fan-out, fidelity and oracle tasks and the benchmark all use it.

`EvictionHooks` (what `policy.attach(model)` and `obcache.attach(model)`
return) adds, while entered:

1. the model's attention implementation switched to `obcache-sdpa` /
   `obcache-eager` (attention.py), restored on exit;
2. a pre-hook on the decoder: give it an `EvictableCache` (replacing an empty
   `DynamicCache`), check the prompt (left padding only, long enough for the
   policy) before any work, record the new tokens' positions in the cache,
   fill in true RoPE positions if none were given, and pass the cache to the
   attention function;
3. after each attention module's first forward on a layer (the prefill):
   let the policy choose the kept tokens and shrink that layer at once, so the
   full caches of all layers never coexist with scoring temporaries.
"""

from __future__ import annotations

import inspect
import time
import torch
from torch import nn
from transformers import DynamicCache

from obcache.attention import IMPLEMENTATIONS, register
from obcache.cache import EvictableCache
from obcache.layer_state import LayerState, Selector
from obcache.models import FamilyAdapter, attention_layers, check_attention_implementation, check_supported_config

class LayerHooks:
    """Hands every attention layer's state, right after its forward, to `layer_done(layer_idx, state, cache, prefill)`.

    `prefill` is True for the forward that first filled the layer. Only
    forwards on an `EvictableCache` are reported, and only uniform layers.
    A context manager: a post-hook on every attention module, and a pre-hook
    on its output projection that captures the per-head attention outputs
    the model just computed (so the scores need not recompute them).
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

    def layer_done(self, layer_idx: int, state: LayerState, cache: EvictableCache, prefill: bool) -> None:
        """What to do with a layer's state (subclasses); by default nothing."""

    def wants_state(self, prefill: bool) -> bool:
        """Whether `layer_done` should run after this forward (the state costs a little to build)."""
        return True

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
        if not isinstance(cache, EvictableCache):
            return
        layer = cache.layers[module.layer_idx]
        queries = cache.queries.pop(module.layer_idx, None)  # captured by obcache's attention, if it ran
        prefill = module.layer_idx not in cache.evicted_layers and layer.get_seq_length() == state_queries(args, kwargs)
        if not self.wants_state(prefill):
            return
        state = layer_state(self.adapter, module, args, kwargs, outputs=outputs, queries=queries,
                            num_layers=len(self.attentions))
        with torch.no_grad():
            self.layer_done(module.layer_idx, state, cache, prefill)


class EvictionHooks(LayerHooks):
    """Context manager returned by `policy.attach(model)`: evicts each layer right after its prefill.

    With `policy=None` (`obcache.attach(model)`) it evicts nothing, but lets
    the model run on caches evicted elsewhere. Not re-entrant: entering while
    the model is attached raises.
    """

    def __init__(self, model: nn.Module, policy: Selector | None = None):
        super().__init__(model)
        self.policy = policy
        self._signature = inspect.signature(self.decoder.forward)
        self._implementation: str | None = None
        self._caches: list[EvictableCache] = []

    def __enter__(self) -> "EvictionHooks":
        implementation = self.model.config._attn_implementation
        if implementation in IMPLEMENTATIONS.values():
            raise RuntimeError(
                "obcache is already attached to this model (nested `attach`); "
                "use one `with policy.attach(model):` block at a time"
            )
        register()
        self.model.set_attn_implementation(IMPLEMENTATIONS[implementation])
        self._implementation = implementation
        self._handles.append(self.decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.decoder.register_forward_hook(self._after_forward))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._implementation is not None:
            self.model.set_attn_implementation(self._implementation)
            self._implementation = None
        for cache in self._caches:
            cache.attached = False
        self._caches.clear()

    def wants_state(self, prefill: bool) -> bool:
        if type(self).layer_done is not EvictionHooks.layer_done:
            return True  # a subclass that records states sees every forward
        # decode_select is optional: only selectors that evict during decoding (obcache.Decoding) have it
        return self.policy is not None and (prefill or hasattr(self.policy, "decode_select"))

    def layer_done(self, layer_idx: int, state: LayerState, cache: EvictableCache, prefill: bool) -> None:
        start = time.perf_counter()
        mask = self.policy.select(state) if prefill else self.policy.decode_select(state)
        if mask is not None:
            cache.keep(layer_idx, mask)
        elif prefill:
            cache.mark_kept_all(layer_idx)
        cache.eviction_seconds += time.perf_counter() - start

    def _before_forward(self, module, args, kwargs):
        if args:  # positional arguments: name them (transformers itself passes keywords only)
            kwargs = dict(self._signature.bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
        else:
            kwargs = dict(kwargs)
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        batch, query_length = inputs.shape[:2]
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = self.model.config.use_cache
        if cache is None and not use_cache:
            return (), kwargs
        if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            cache = kwargs["past_key_values"] = EvictableCache()
        if not isinstance(cache, EvictableCache):
            raise TypeError(
                f"obcache needs an EvictableCache or an empty DynamicCache, got a filled {type(cache).__name__}"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError("obcache needs a 2-D attention mask (batch, tokens), not a prepared 4-D mask")
        if cache.seen_tokens == 0 and self.policy is not None:
            lengths = mask.sum(-1).tolist() if mask is not None else [query_length] * batch
            self.policy.check_prompt(lengths)
        cache.begin_forward(mask, batch, query_length, inputs.device)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = cache.positions_for(query_length, inputs.device)
        kwargs["attention_mask"] = None  # the attention function masks from the cache's slot positions
        kwargs["obcache_cache"] = cache
        cache.attached = True
        self._caches.append(cache)
        return (), kwargs

    def _after_forward(self, module, args, output) -> None:
        for cache in self._caches:
            cache.attached = False
        self._caches.clear()


def state_queries(args, kwargs) -> int:
    """Tokens of the forward an attention module just ran."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return hidden.shape[1]


def layer_state(
    adapter: FamilyAdapter, module: nn.Module, args, kwargs, *, outputs: torch.Tensor | None = None,
    queries: torch.Tensor | None = None, num_layers: int = 1,
) -> LayerState:
    """The policy's view of an attention layer right after a forward.

    For a uniform layer, keys/values are the cached [B, Hkv, n, d] and
    `queries(start, end)` serves the slots of this forward's tokens (the last
    q). A ragged layer gets a shape-only view: keys/values of head_dim 0 over a
    [B, Hkv, W] grid whose segments end at the right edge, and a per-head
    key_mask; its slots are read from `state.layer`. `outputs`, if given, is
    the input of the module's output projection in that forward,
    [B, q, Hq * d] (per-head attention outputs, heads side by side); `queries`,
    if given, the post-RoPE queries [B, Hq, q, d] the attention received
    (otherwise they are rebuilt from the module's input).
    """
    cache = kwargs.get("past_key_values")
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    layer = cache.layers[module.layer_idx]
    cos, sin = kwargs["position_embeddings"]
    tokens = hidden.shape[1]

    captured = queries

    def new_queries() -> torch.Tensor:
        return captured if captured is not None else adapter.queries(module, hidden, cos, sin)

    new_outputs = None
    if outputs is not None and outputs.shape[:2] == hidden.shape[:2]:

        def new_outputs() -> torch.Tensor:
            # [B, q, Hq * dv] -> [B, Hq, q, dv]: the layout of the attention before its reshape (a view).
            heads = outputs.shape[-1] // module.head_dim  # this rank's heads under tensor parallelism
            return outputs.view(outputs.shape[0], tokens, heads, -1).transpose(1, 2)

    if cache.is_ragged(module.layer_idx):
        _, valid = layer.right_aligned()
        keys = values = layer.keys.new_empty(*valid.shape, 0)
        key_mask, first = valid, None
    else:
        keys, values, key_mask = layer.keys, layer.values, layer.slot_mask()
        first = layer.get_seq_length() - tokens  # slot of this forward's first token

    def rows(start: int, end: int) -> slice:
        if first is None or start < first:
            raise ValueError(f"only the slots of this forward's {tokens} tokens have queries, not slot {start}")
        return slice(start - first, end - first)

    def window_queries(start: int, end: int) -> torch.Tensor:
        part = rows(start, end)
        if captured is not None:
            return captured[:, :, part]
        return adapter.queries(module, hidden[:, part], cos[:, part], sin[:, part])

    window_outputs = None
    if new_outputs is not None:

        def window_outputs(start: int, end: int) -> torch.Tensor:
            return new_outputs()[:, :, rows(start, end)]

    return LayerState(
        keys=keys,
        values=values,
        scaling=module.scaling,
        query_heads=module.config.num_attention_heads * keys.shape[1] // module.config.num_key_value_heads,
        key_mask=key_mask,
        queries=window_queries,
        outputs=window_outputs,
        layer_idx=module.layer_idx,
        num_layers=num_layers,
        layer=layer,
        new_queries=new_queries,
        new_outputs=new_outputs,
    )


def attach(model: nn.Module, policy: Selector | None = None) -> EvictionHooks:
    """Context manager: run `model` on obcache caches, evicting with `policy` (None: evict nothing)."""
    return EvictionHooks(model, policy)
