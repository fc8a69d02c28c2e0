"""Attach obcache to a transformers model: forward hooks that feed the layer observers.

`Attachment` (what `attach(model, policy)` and `policy.attach(model)` return)
adds, while entered:

1. the model's attention implementation switched to `obcache-sdpa` /
   `obcache-eager` (attention.py), restored on exit, and a `model.generate`
   that refuses, before any work, modes an evicting cache cannot serve;
2. a pre-hook on the decoder: give it an `EvictableCache` (replacing an empty
   `DynamicCache`), check the prompt (left padding only; each observer's
   `before_prefill`) before any work, record the new tokens' positions in the
   cache, fill in true RoPE positions if none were given, and make the
   forward's `ForwardRecord`, which the attention function receives;
3. after each attention module's forward: the layer's `LayerState` to every
   observer that wants it (`capture.py`); after the decoder's forward, each
   observer's `forward_done`.

Eviction is one observer (`obcache.eviction.Evictor`); `attach(model)` with
no policy evicts nothing but runs the model on caches evicted elsewhere.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
import torch
import torch.distributed as dist
from torch import nn
from transformers import DynamicCache
from transformers.generation.configuration_utils import GenerationMode

from obcache.attention import IMPLEMENTATIONS, register
from obcache.cache import EvictableCache
from obcache.compat import given_cache, put_cache
from obcache.capture import Observer, layer_state
from obcache.eviction import Evictor
from obcache.forward import ForwardRecord
from obcache.models import (
    attention_layers, check_attention_implementation, check_supported_config, tensor_parallel_ranks,
)
from obcache.selector import Selector

#: Generation modes that run on an obcache cache: one sequence per row, fed token by token.
SUPPORTED_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)


class Attachment:
    """Context manager: while entered, `model` runs on obcache caches and its layers' states go to `observers`.

    Not re-entrant: entering while the model is attached raises. `policy`: the (prepared) selector that evicts,
    if any. `tokenizer` and `chat_template` are for selectors that write prompts of their own (KVzip).
    """

    def __init__(self, model: nn.Module, observers: Sequence[Observer] = (), *, policy: Selector | None = None,
                 tokenizer=None, chat_template: bool = True):
        self.adapter = check_supported_config(model.config)
        check_attention_implementation(model)
        self.model, self.policy = model, policy
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.attentions = attention_layers(self.decoder)
        self.observers = list(observers)
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self._signature = inspect.signature(self.decoder.forward)
        self._handles: list = []
        self._records: list[ForwardRecord] = []  # the forwards running now, innermost last
        self._implementation: str | None = None

    def __enter__(self) -> Attachment:
        implementation = self.model.config._attn_implementation
        check_attention_implementation(self.model)
        register()
        self.model.set_attn_implementation(IMPLEMENTATIONS[implementation])
        self._implementation = implementation
        self._handles.append(self.decoder.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.decoder.register_forward_hook(self._after_forward, with_kwargs=True))
        for attention in self.attentions:
            self._handles.append(attention.register_forward_hook(self._after_attention, with_kwargs=True))
            projection = getattr(attention, self.adapter.output_projection or "", None)
            if projection is not None:
                self._handles.append(projection.register_forward_pre_hook(self._capture(attention.layer_idx)))
        if hasattr(self.model, "generate"):
            self.model.generate = _checked_generate(self.model)  # an instance attribute, removed on exit
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()
        if self._implementation is not None:
            self.model.set_attn_implementation(self._implementation)
            self._implementation = None
        self.model.__dict__.pop("generate", None)

    @contextmanager
    def observing(self, observer: Observer) -> Iterator[None]:
        """While inside, `observer` sees every layer too, before the others (extra forwards that score)."""
        self.observers.insert(0, observer)
        try:
            yield
        finally:
            self.observers.remove(observer)

    # -- the hooks --

    def _capture(self, layer_idx: int):
        records = self._records

        def hook(module, args):
            if records:
                records[-1].outputs[layer_idx] = args[0]

        return hook

    def _before_forward(self, module, args, kwargs):
        if args:  # positional arguments: name them (transformers itself passes keywords only)
            kwargs = dict(self._signature.bind_partial(*args, **kwargs).arguments)
            kwargs.update(kwargs.pop("kwargs", {}))
        else:
            kwargs = dict(kwargs)
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        batch, query_length = inputs.shape[:2]
        cache = given_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = self.model.config.use_cache
        if cache is None and not use_cache:
            return (), kwargs
        if cache is None or (type(cache) is DynamicCache and cache.get_seq_length() == 0):
            cache = EvictableCache()
        if not isinstance(cache, EvictableCache):
            state = "a filled" if cache.get_seq_length() > 0 else "an empty"
            raise TypeError(
                f"obcache needs an EvictableCache or an empty DynamicCache, got {state} {type(cache).__name__} "
                "(do not set cache_implementation; obcache brings its own cache)"
            )
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise ValueError("obcache needs a 2-D attention mask (batch, tokens), not a prepared 4-D mask")
        record = ForwardRecord(cache, positions=torch.empty(0), prefill=cache.seen_tokens == 0,
                               input_ids=kwargs.get("input_ids"),
                               want_log_normalizers=any(o.wants_log_normalizers for o in self.observers))
        if record.prefill:
            lengths = mask.sum(-1).tolist() if mask is not None else [query_length] * batch
            for observer in self.observers:
                observer.before_prefill(lengths, record)
        record.positions = cache.begin_forward(mask, batch, query_length, inputs.device)
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = cache.positions_for(query_length, inputs.device)
        kwargs["attention_mask"] = None  # the attention function masks from the cache's slot positions
        put_cache(kwargs, self.decoder, cache)  # under the keyword this transformers' decoder takes
        kwargs["obcache_forward"] = record
        self._records.append(record)
        return (), kwargs

    def _after_attention(self, module, args, kwargs, output) -> None:
        record = kwargs.get("obcache_forward")
        if record is None:
            return
        observers = [observer for observer in self.observers
                     if observer.wants(record) and observer.layer_passed(record, module.layer_idx)]
        if observers:
            state = layer_state(self.adapter, module, args, kwargs, record, num_layers=len(self.attentions),
                                rotary_emb=getattr(self.decoder, "rotary_emb", None))
            with torch.no_grad():
                for observer in observers:
                    observer.layer_done(state, record)
        for captured in (record.queries, record.outputs, record.log_normalizers):
            captured.pop(module.layer_idx, None)

    def _after_forward(self, module, args, kwargs, output) -> None:
        record = kwargs.get("obcache_forward")
        if record is None:
            return
        self._records.remove(record)
        with torch.no_grad():
            for observer in list(self.observers):
                observer.forward_done(record, self)


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
    ranks, group = tensor_parallel_ranks(model), policy.group
    if group is None:
        if ranks > 1 and policy.chooses_across_heads:
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


def attach(model: nn.Module, policy: Selector | None = None, *, tokenizer=None, chat_template: bool = True,
           observers: Sequence[Observer] = ()) -> Attachment:
    """Context manager: run `model` on obcache caches, evicting with `policy` (None: evict nothing).

    The policy is prepared for the model first (`Selector.prepare`: KVzip's head ratings, fitted once per model;
    that needs the `tokenizer`). `observers` see every layer's state too (after the eviction's)."""
    check_supported_config(model.config)
    check_attention_implementation(model)
    evicting: list[Observer] = []
    if policy is not None:
        policy = policy.prepare(model, tokenizer, chat_template=chat_template)
        _check_tensor_parallel(model, policy)
        evicting.append(Evictor(policy))
    return Attachment(model, [*evicting, *observers], policy=policy, tokenizer=tokenizer, chat_template=chat_template)
