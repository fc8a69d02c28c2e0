"""Head ratings for KVzip's context-independent variant (`KVzip(source="heads")`), once per model.

The model reads a calibration text (`policy.calibration` tokens of the
shipped Jargon File) and repeats it, teacher-forced (reconstruction.py). A KV
head's rating is the mean over the text's tokens, sinks aside, of the
policy's reconstruction score (its `score`, `gqa` and `aggregate`): heads
that look far back to copy the context rate high, heads that watch the sinks
and their own recent tokens rate near zero. After that, compressing a
context costs its prefill alone.

    policy = GlobalKV(KVzip(source="heads", budget=0.5))
    seconds = calibrate(model, tokenizer, policy)   # sets policy's head_scores [layers, Hkv]; once per model
    with policy.attach(model):
        ...
"""

from __future__ import annotations

import dataclasses
import time
import weakref

import torch
from torch import nn

from obcache.cache import EvictableCache
from obcache.hooks import attach
from obcache.layer_state import Selector
from obcache.models import kv_heads, tensor_parallel_ranks
from obcache.policies import KVzip
from obcache.policies.allocation import BudgetWrapper, PooledBudget, innermost
from obcache.reconstruction import reconstruct, reconstruction_inputs
from obcache.text import document_ids


def needs_calibration(selector: Selector | None) -> bool:
    """Whether `selector` rates whole heads (`KVzip(source="heads")`) and so needs `calibrate` first."""
    base = innermost(selector) if selector is not None else None
    return isinstance(base, KVzip) and base.source == "heads"


@torch.no_grad()
def head_ratings(model: nn.Module, tokenizer, policy: KVzip, *, chat_template: bool = True) -> torch.Tensor:
    """[layers, Hkv] float32: per KV head, the mean reconstruction score of the calibration text's tokens
    after the sinks (module docstring)."""
    ids = document_ids(tokenizer, policy.calibration)
    probe = dataclasses.replace(policy, source="reconstruction", head_scores=None)
    with attach(model):
        cache = EvictableCache(config=model.config)
        model(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        inputs = reconstruction_inputs(tokenizer, ids, chunk=probe.reconstruct_chunk, chat_template=chat_template)
        layers = reconstruct(model, cache, inputs, {0: probe})[0][0]
    return torch.stack([scores[0, :, probe.sinks:].float().mean(-1) for scores in layers]).cpu()


def calibrate(model: nn.Module, tokenizer, selector: Selector, *, chat_template: bool = True) -> float:
    """Rate the heads of `model` for `selector` if it is a `KVzip(source="heads")` (under its allocation) not yet
    rated on this model; returns the seconds spent (0 when there was nothing to do)."""
    if not needs_calibration(selector):
        return 0.0
    if not _moves_budget_between_heads(selector):
        raise ValueError(
            "KVzip(source='heads') rates whole heads: it needs an allocation that moves budget between heads, "
            "global or adakv (GlobalKV(KVzip(source='heads', ...)))"
        )
    policy = innermost(selector)
    if policy.head_scores is not None:
        shape, expected = tuple(policy.head_scores.shape), _heads_shape(model)
        if shape != expected:
            raise ValueError(f"{policy.name}: head_scores has shape {shape}, but the model has {expected[0]} layers "
                             f"of {expected[1]} KV heads: rate the heads on this model (head_scores=None)")
    if policy.head_scores is not None and (policy.rated_on is None or policy.rated_on() is model):
        return 0.0  # rated on this model, or given by the user
    if tokenizer is None:
        raise ValueError("KVzip(source='heads') needs the tokenizer to calibrate: it makes the model repeat a text")
    start = time.perf_counter()
    policy.head_scores = head_ratings(model, tokenizer, policy, chat_template=chat_template)
    policy.rated_on = weakref.ref(model)
    return time.perf_counter() - start


def _heads_shape(model: nn.Module) -> tuple[int, int]:
    """(layers, KV heads) of `model`: this rank's heads when it is split by tensor parallelism."""
    config = model.config.get_text_config()
    return config.num_hidden_layers, kv_heads(config) // tensor_parallel_ranks(model)


def _moves_budget_between_heads(selector: Selector) -> bool:
    while isinstance(selector, BudgetWrapper):
        if isinstance(selector, PooledBudget):
            return True
        selector = selector.policy
    return False
