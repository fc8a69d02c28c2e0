"""Oracle gap: how close each score's kept set comes to the best set for the true future queries.

For a captured layer, one KV head, its prompt keys/values k_p, v_p (p < N) and
the true post-RoPE queries q_i of the next M tokens of its G query heads
(R = G*M rows), restricted to the prompt keys:

    o_i(S) = sum_{p in S} softmax_{p in S}(s q_i.k_p) v_p,   o*_i = o_i(all prompt keys)
    E(S)   = sum_i ||o_i(S) - o*_i||^2
    error  = sqrt(sum_heads E(S) / sum_heads sum_i ||o*_i||^2)     (relative, per layer)

Score sets: the kept positions each policy (window scoring as configured)
chooses at prefill. The **greedy oracle** knows the q_i: backward elimination
from S = all prompt keys; each round computes, for every p in S, the exact
error E(S \\ {p}) after deleting p (softmax renormalised:
o_i(S \\ p) - o*_i = (r_i + A_ip (o*_i - v_p)) / (1 - A_ip), r_i = o_i(S) - o*_i,
A the weights over S), and deletes the ceil(`step` * |S|) tokens with the
smallest E(S \\ {p}) (clipped so every requested size is hit exactly).
The reported **oracle** set of a head at size B is the better of the greedy set
and every candidate score set of that size, so it is never worse than any score
in-sample; `greedy` is also reported alone. The gap closed by score s is

    (error_attention - error_s) / (error_attention - error_oracle)
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
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
from obcache.policies import Selector
from obcache.models import attention_layers


def kept_set_errors(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, kept: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E(S) [Hkv], sum_i ||o*_i||^2 [Hkv]) for the keep mask `kept` [Hkv, N] (None = all).

    queries [Hkv, R, d] (all R rows attend to every key), keys [Hkv, N, d], values [Hkv, N, dv].
    """
    z = scaling * torch.matmul(queries.float(), keys.float().transpose(-1, -2))  # [Hkv, R, N]
    values = values.float()
    full = torch.matmul(torch.softmax(z, -1), values)
    if kept is None:
        return torch.zeros(z.shape[0]), full.square().sum((-1, -2))
    hidden = ~kept[:, None, :]  # [Hkv, 1, N]
    partial = torch.matmul(torch.softmax(z.masked_fill(hidden, float("-inf")), -1), values)
    return (partial - full).square().sum((-1, -2)), full.square().sum((-1, -2))


@torch.no_grad()
def greedy_oracle(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, sizes: list[int], *, step: float = 0.05
) -> dict[int, torch.Tensor]:
    """Greedy backward elimination (module docstring); keep mask [Hkv, N] per size B.

    Shapes as in `kept_set_errors`; every size in [1, N].
    """
    heads, _, length = keys.shape[0], queries.shape[1], keys.shape[1]
    if any(not 1 <= size <= length for size in sizes):
        raise ValueError(f"sizes must lie in [1, {length}], got {sizes}")
    z = scaling * torch.matmul(queries.float(), keys.float().transpose(-1, -2))  # [H, R, N]
    v = values.float()
    target = torch.matmul(torch.softmax(z, -1), v)  # o* [H, R, dv]
    target_v = torch.matmul(target, v.transpose(-1, -2))  # <o*_i, v_p>
    target_sq = target.square().sum(-1, keepdim=True)  # ||o*_i||^2 [H, R, 1]
    v_sq = v.square().sum(-1)[:, None, :]  # ||v_p||^2 [H, 1, N]
    alive = torch.ones(heads, length, dtype=torch.bool)
    results: dict[int, torch.Tensor] = {}
    pending = sorted(set(sizes), reverse=True)
    count = length
    while pending:
        if count == pending[0]:
            results[pending.pop(0)] = alive.clone()
            continue
        weights = torch.softmax(z.masked_fill(~alive[:, None], float("-inf")), -1)  # A over S
        residual = torch.matmul(weights, v) - target  # r_i
        r_sq = residual.square().sum(-1, keepdim=True)
        r_target = (residual * target).sum(-1, keepdim=True)
        r_v = torch.matmul(residual, v.transpose(-1, -2))
        # ||r + A (o* - v)||^2 / (1 - A)^2, summed over the rows i
        numerator = r_sq + 2 * weights * (r_target - r_v) + weights.square() * (target_sq - 2 * target_v + v_sq)
        cost = (numerator / (1 - weights).clamp_min(1e-6).square()).sum(1)  # [H, N]
        cost.masked_fill_(~alive, float("inf"))
        drop = min(max(1, math.ceil(step * count)), count - pending[0])
        alive.scatter_(1, cost.topk(drop, dim=-1, largest=False).indices, False)
        count -= drop
    return results


@dataclass
class OracleResult:
    """Relative output error per captured layer (in `layers` order) of one kept set."""

    layer_errors: list[float]
    kept_tokens: int

    @property
    def error(self) -> float:
        return sum(self.layer_errors) / len(self.layer_errors)


class _Queries(Observer):
    """Keeps the post-RoPE queries [Hkv, G*M, d] of chosen layers."""

    def __init__(self, layers: list[int]):
        self.layers = set(layers)
        self.queries: dict[int, torch.Tensor] = {}

    def layer_done(self, state: LayerState, record: ForwardRecord) -> None:
        if state.layer_idx in self.layers:
            q = state.new_queries()[0]  # [Hq, M, d]
            self.queries[state.layer_idx] = q.reshape(state.kv_heads, -1, q.shape[-1])  # head h -> KV head h // G


@torch.no_grad()
def future_queries(model: nn.Module, cache: EvictableCache, ids: list[int], layers: list[int]) -> dict[int, torch.Tensor]:
    """Post-RoPE queries [Hkv, G*M, d] of `ids` fed on `cache` (grown), per layer in `layers`."""
    recorder = _Queries(layers)
    with attach(model, observers=[recorder]):
        forward_tokens(model, cache, ids)
    return recorder.queries


def evaluate_oracle(
    model: nn.Module,
    ids: list[int],
    prompt_length: int,
    policies: Mapping[Hashable, Selector | None],
    layers: list[int],
    *,
    step: float = 0.05,
) -> tuple[dict[Hashable, OracleResult], dict[int, OracleResult], dict[int, OracleResult]]:
    """Errors of every policy's kept set, and of the oracle and greedy sets, on the future queries.

    Prefill ids[:N] (N = prompt_length) once; the future queries are those of
    ids[N:] fed on the full cache. Returns (per policy key, oracle per kept size,
    greedy per kept size), the sizes being those the policies keep.
    """
    if not 0 < prompt_length < len(ids):
        raise ValueError(f"prompt_length must leave future tokens among the {len(ids)} ids, got {prompt_length}")
    modules = attention_layers(model)
    if any(not 0 <= layer < len(modules) for layer in layers) or not layers:
        raise ValueError(f"layers must be a non-empty list in [0, {len(modules) - 1}], got {layers}")
    shared = shared_prefill(model, ids[:prompt_length], policies)
    queries = future_queries(model, shared.cache.subset([None] * len(modules)), ids[prompt_length:], layers)
    sizes = sorted({_kept(policy, prompt_length) for policy in policies.values()} - {prompt_length})

    per_policy: dict[Hashable, list[float]] = {key: [] for key in policies}
    best: dict[int, list[float]] = {size: [] for size in sizes}
    greedy: dict[int, list[float]] = {size: [] for size in sizes}
    for layer in layers:
        keys = shared.cache.layers[layer].keys[0]
        values = shared.cache.layers[layer].values[0]
        q, scaling = queries[layer], modules[layer].scaling
        _, reference = kept_set_errors(q, keys, values, scaling, None)
        errors = {}
        for key in policies:
            kept = shared.masks[key][layer]
            errors[key] = kept_set_errors(q, keys, values, scaling, None if kept is None else kept[0])[0]
            per_policy[key].append(_relative(errors[key], reference))
        for size, kept in greedy_oracle(q, keys, values, scaling, sizes, step=step).items():
            greedy_error = kept_set_errors(q, keys, values, scaling, kept)[0]
            candidates = [greedy_error] + [
                errors[key] for key, policy in policies.items()
                if _kept(policy, prompt_length) == size and _uniform(shared.masks[key][layer], size)
            ]
            greedy[size].append(_relative(greedy_error, reference))
            best[size].append(_relative(torch.stack(candidates).min(0).values, reference))  # per KV head
    kept_of = {key: _kept(policy, prompt_length) for key, policy in policies.items()}
    return (
        {key: OracleResult(errors, kept_of[key]) for key, errors in per_policy.items()},
        {size: OracleResult(errors, size) for size, errors in best.items()},
        {size: OracleResult(errors, size) for size, errors in greedy.items()},
    )


def _kept(policy: Selector | None, length: int) -> int:
    """Tokens per KV head a policy keeps on average (its budget)."""
    return length if policy is None else policy.kept_tokens(length)


def _uniform(mask: torch.Tensor | None, size: int) -> bool:
    """Whether every head of a keep mask [1, Hkv, N] keeps `size` tokens (None: all of them)."""
    return mask is None or bool((mask.sum(-1) == size).all())


def _relative(errors: torch.Tensor, reference: torch.Tensor) -> float:
    """sqrt(sum_heads E / sum_heads ||o*||^2)."""
    return float((errors.sum() / reference.sum()).sqrt())
