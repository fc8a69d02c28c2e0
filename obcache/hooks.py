"""Attach obcache to a transformers model with forward hooks.

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
   full caches of all layers never coexist with scoring temporaries;
4. for selectors that need every layer first (KVzip's context reconstruction,
   `GlobalKV`): after the decoder's prefill forward, choose for all layers
   (reconstruction.py) and shrink them.
"""

from __future__ import annotations

import copy
import functools
import inspect
import time

import torch
import torch.distributed as dist
from torch import nn
from transformers import DynamicCache
from transformers.generation.configuration_utils import GenerationMode

from obcache.attention import IMPLEMENTATIONS, register
from obcache.cache import EvictableCache
from obcache.capture import LayerHooks
from obcache.layer_state import LayerState, Selector
from obcache.models import tensor_parallel_ranks
from obcache.reconstruction import select_after_prefill


class EvictionHooks(LayerHooks):
    """Context manager returned by `policy.attach(model)`: evicts each layer right after its prefill.

    With `policy=None` (`obcache.attach(model)`) it evicts nothing, but lets
    the model run on caches evicted elsewhere. Not re-entrant: entering while
    the model is attached raises.
    """

    def __init__(self, model: nn.Module, policy: Selector | None = None, *, tokenizer=None, chat_template: bool = True):
        super().__init__(model)
        self.policy = policy
        if policy is not None and getattr(policy, "needs_reconstruction", False) and tokenizer is None:
            raise ValueError(
                f"{policy.name} makes the model repeat the context and needs the tokenizer to write that prompt: "
                "policy.attach(model, tokenizer=tokenizer)"
            )
        if policy is not None:
            policy.check_ready()
            _check_tensor_parallel(model, policy)
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self._signature = inspect.signature(self.decoder.forward)
        self._implementation: str | None = None
        self._caches: list[EvictableCache] = []
        # Selectors that choose after all layers: the prefill's cache and ids, and each layer's prefill scores.
        self._after_prefill: tuple[EvictableCache, list[int]] | None = None
        self._prefill_scores: list[torch.Tensor] = []

    @property
    def _all_layers(self) -> bool:
        return self.policy is not None and getattr(self.policy, "selects_after_all_layers", False)

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
        if hasattr(self.model, "generate"):
            self.model.generate = _checked_generate(self.model)  # an instance attribute, removed on exit
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._implementation is not None:
            self.model.set_attn_implementation(self._implementation)
            self._implementation = None
        self.model.__dict__.pop("generate", None)
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
        if prefill and self._all_layers:  # chosen after the last layer (_after_forward)
            if not self.policy.needs_reconstruction:
                self._prefill_scores.append(self.policy.token_scores(state))
            cache.eviction_seconds += time.perf_counter() - start
            return
        mask = self.policy.select(state) if prefill else self.policy.decode_select(state)
        cache.keep(layer_idx, mask)  # None: keeps all (after the prefill, the layer is already recorded)
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
            state = "a filled" if cache.get_seq_length() > 0 else "an empty"
            raise TypeError(
                f"obcache needs an EvictableCache or an empty DynamicCache, got {state} {type(cache).__name__} "
                "(do not set cache_implementation; obcache brings its own cache)"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError("obcache needs a 2-D attention mask (batch, tokens), not a prepared 4-D mask")
        if cache.seen_tokens == 0 and self.policy is not None:
            lengths = mask.sum(-1).tolist() if mask is not None else [query_length] * batch
            self.policy.check_prompt(lengths)
            if self._all_layers:
                if self.policy.needs_reconstruction and kwargs.get("input_ids") is None:
                    raise ValueError(f"{self.policy.name} repeats the context from its token ids: pass input_ids")
                ids = kwargs["input_ids"][0].tolist() if kwargs.get("input_ids") is not None else []
                self._after_prefill, self._prefill_scores = (cache, ids), []
        cache.begin_forward(mask, batch, query_length, inputs.device)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = cache.positions_for(query_length, inputs.device)
        kwargs["attention_mask"] = None  # the attention function masks from the cache's slot positions
        kwargs["obcache_cache"] = cache
        cache.attached = True
        self._caches.append(cache)
        return (), kwargs

    def _after_forward(self, module, args, output) -> None:
        if self._after_prefill is not None:
            (cache, ids), self._after_prefill = self._after_prefill, None
            start = time.perf_counter()
            masks = select_after_prefill(
                self.model, cache, ids, {0: self.policy}, {0: self._prefill_scores}, tokenizer=self.tokenizer,
                chat_template=self.chat_template,
            )[0][0]
            self._prefill_scores = []
            for layer_idx, mask in enumerate(masks):
                cache.keep(layer_idx, mask)
            cache.eviction_seconds += time.perf_counter() - start
        for cache in self._caches:
            cache.attached = False
        self._caches.clear()


#: Generation modes that run on an obcache cache: one sequence per row, fed token by token.
SUPPORTED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


def _checked_generate(model: nn.Module):
    """`model.generate` that refuses, before any work, what an evicting cache cannot serve: beam search and
    assisted (prompt-lookup, speculative) decoding reorder or crop the cache; cache_implementation replaces it."""
    generate = model.generate

    @functools.wraps(generate)
    def checked(*args, **kwargs):
        config = copy.deepcopy(kwargs.get("generation_config") or model.generation_config)
        config.update(**{key: value for key, value in kwargs.items() if key != "generation_config"})
        mode = config.get_generation_mode(kwargs.get("assistant_model"))
        if mode not in SUPPORTED_MODES:
            raise ValueError(
                f"obcache caches support greedy decoding and sampling only, not {mode.value.replace('_', ' ')} "
                "(beam search and assisted decoding reorder or crop the cache): use num_beams=1 and no "
                "assistant model or prompt_lookup_num_tokens"
            )
        if config.cache_implementation is not None:
            raise ValueError(f"cache_implementation={config.cache_implementation!r} replaces obcache's own cache; "
                             "leave it unset under attach")
        return generate(*args, **kwargs)

    return checked


def _check_tensor_parallel(model: nn.Module, policy: Selector) -> None:
    """A model split by transformers' tensor parallelism holds some KV heads per rank: a policy that chooses
    across heads needs the ranks' process group, and a group needs a model split over exactly its ranks."""
    ranks, group = tensor_parallel_ranks(model), getattr(policy, "group", None)
    if group is None:
        if ranks > 1 and getattr(policy, "chooses_across_heads", False):
            raise ValueError(
                f"the model is split over {ranks} ranks (tensor parallelism) and {policy.name} chooses over all "
                "KV heads of a layer: give the policy the ranks' process group, e.g. "
                "SnapKV(..., group=obcache.tensor_parallel_group(model))"
            )
        return
    if ranks != dist.get_world_size(group):
        raise ValueError(
            f"the policy's process group has {dist.get_world_size(group)} ranks but the model is split "
            f"over {ranks} by tensor parallelism; the group must be the ranks that hold the model's KV heads"
        )


def attach(model: nn.Module, policy: Selector | None = None, *, tokenizer=None, chat_template: bool = True) -> EvictionHooks:
    """Context manager: run `model` on obcache caches, evicting with `policy` (None: evict nothing).

    `tokenizer` and `chat_template` are for policies that make the model repeat the context (`obcache.KVzip`)."""
    return EvictionHooks(model, policy, tokenizer=tokenizer, chat_template=chat_template)
