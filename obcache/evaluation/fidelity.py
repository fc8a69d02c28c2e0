"""Output fidelity after eviction, on long running text, with teacher forcing.

Prefill the first N tokens x_1..x_N of a document, evict to the budget, then
feed the next M tokens x_{N+1}..x_{N+M} in one forward on the evicted cache.
With p(. | x_<=t) the next-token distributions of those M positions and
q(.) the same under the full cache:

    perplexity  exp(-1/M sum_t log p(x_{t+1} | x_<=t))
    KL          1/M sum_t sum_v q_t(v) (log q_t(v) - log p_t(v))       KL(full || evicted), nats
    top-1       1/M sum_t [argmax p_t = argmax q_t]
    error_l     ||O_l - O*_l||_F / ||O*_l||_F, per layer l

where O_l [M, Hq*d] are the M tokens' attention outputs of layer l before the
output projection (the input of `o_proj`), O*_l the full-cache ones. Errors
compound through the layers: layer l's output sees the earlier layers' errors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from obcache.cache import EvictableCache
from obcache.fanout import shared_prefill
from obcache.generation import forward_tokens
from obcache.capture import Observer
from obcache.forward import ForwardRecord
from obcache.hooks import attach
from obcache.layer_state import LayerState
from obcache.models import attention_layers
from obcache.policies import Selector


@dataclass
class Fidelity:
    """Metrics of one evicted cache against the full cache on the same M tokens."""

    perplexity: float
    kl: float
    top1: float
    layer_errors: list[float]
    kept_tokens: int
    cache_bytes: int
    seconds: float
    held: dict  # `measure(cache)` of the evicted cache (default: its nbytes as cache_bytes)


@dataclass
class _Pass:
    """One teacher-forced pass: log-probs [M, V] and attention outputs per layer [M, Hq*d]."""

    log_probs: torch.Tensor
    outputs: list[torch.Tensor]


class _Outputs(Observer):
    """Keeps every layer's attention outputs of the forward's tokens."""

    def __init__(self, layers: int):
        self.outputs: list[torch.Tensor | None] = [None] * layers

    def layer_done(self, state: LayerState, record: ForwardRecord) -> None:
        outputs = state.new_outputs()[0]  # [Hq, M, d], whatever the layer's layout (uniform or ragged)
        self.outputs[state.layer_idx] = outputs.transpose(0, 1).reshape(outputs.shape[1], -1).float()


@torch.no_grad()
def teacher_forced(model: nn.Module, cache: EvictableCache, ids: list[int]) -> _Pass:
    """Feed `ids` on `cache` in one forward; capture every layer's attention outputs (the `o_proj` input)."""
    recorder = _Outputs(len(attention_layers(model)))
    with attach(model, observers=[recorder]):
        logits = forward_tokens(model, cache, ids, every_position=True)
    return _Pass(torch.log_softmax(logits.float(), dim=-1), recorder.outputs)


def compare(full: _Pass, evicted: _Pass, targets: torch.Tensor) -> tuple[float, float, float, list[float]]:
    """(perplexity, KL(full || evicted), top-1 agreement, per-layer relative output errors); targets [M]."""
    nll = -evicted.log_probs.gather(-1, targets[:, None]).mean()
    kl = (full.log_probs.exp() * (full.log_probs - evicted.log_probs)).sum(-1).mean()
    top1 = (full.log_probs.argmax(-1) == evicted.log_probs.argmax(-1)).float().mean()
    errors = [float((o - o_full).norm() / o_full.norm()) for o, o_full in zip(evicted.outputs, full.outputs)]
    return float(nll.exp()), float(kl), float(top1), errors


def evaluate_fidelity(
    model: nn.Module, ids: list[int], prompt_length: int, policies: Mapping[Hashable, Selector | None], *,
    tokenizer=None, measure: Callable[[EvictableCache], dict] | None = None,
) -> dict[Hashable, Fidelity]:
    """Prefill ids[:N] once (N = prompt_length), evict with each policy, teacher-force ids[N:-1].

    The targets are ids[N+1:], so M = len(ids) - N - 1 >= 1 tokens are scored.
    A None policy is the full cache (KL 0, top-1 1, errors 0 by construction). `tokenizer` writes the
    reconstruction prompt of KVzip policies (the ids are plain text, no chat template). `measure`: what each
    evicted cache holds, measured before the continuation is fed (`Fidelity.held`).
    """
    if not 0 < prompt_length < len(ids) - 1:
        raise ValueError(f"prompt_length must leave at least 2 tokens of the {len(ids)} ids, got {prompt_length}")
    shared = shared_prefill(model, ids[:prompt_length], policies, tokenizer=tokenizer, chat_template=False)
    future = ids[prompt_length:-1]
    targets = torch.tensor(ids[prompt_length + 1 :], device=model.device)
    full = teacher_forced(model, shared.cache.subset([None] * len(shared.cache.layers)), future)
    results: dict[Hashable, Fidelity] = {}
    for key in policies:
        cache = shared.evicted(key)
        kept, nbytes = cache.kept_tokens()[0], cache.kv_nbytes()
        held = {"cache_bytes": nbytes} if measure is None else measure(cache)
        start = time.perf_counter()
        evicted = teacher_forced(model, cache, future)
        seconds = time.perf_counter() - start
        results[key] = Fidelity(*compare(full, evicted, targets), kept_tokens=kept, cache_bytes=nbytes, seconds=seconds,
                                held=held)
    return results
