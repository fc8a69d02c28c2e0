"""Eviction during generation: a fixed cache budget however long the output.

    with Decoding(H2O(score="obc-joint", budget=0.2), capacity=512, interval=16).attach(model):
        model.generate(...)

The prompt is evicted by the wrapped policy as usual (its `budget`). After
every later forward, once the KV heads of a batch row hold `capacity +
interval` slots on average in a layer, that row is evicted back to `capacity`
per head, with the wrapped
policy's selection (shared, chunks, AdaKV, protected sinks and recent window)
and its own score, as each policy defines it during decoding:

- H2O: the running sum of every query's score (prompt window first, then each
  generated token's query as it passes: a rider of the layer's slots);
- TOVA: the newest query alone;
- SnapKV: the last `window` queries (kept post-RoPE as they pass), pooled;
- StreamingLLM: sinks and the most recent tokens.

Scores use the queries and attention outputs of the forwards as they pass,
and never build an L x L matrix; eviction every `interval` steps amortises the
scoring and the copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist

from obcache.layer_state import LayerState
from obcache.policies.allocation import Wrapper
from obcache.policies.base import Policy, check_count


@dataclass
class Decoding(Wrapper):
    """Evict during generation too: back to `capacity` tokens per KV head every `interval` new tokens."""

    name: ClassVar[str] = "decoding"
    capacity: int = 512
    interval: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.policy, Decoding):
            raise ValueError("Decoding wraps a policy that evicts after the prompt, not another Decoding: its "
                             "capacity would be ignored; use one Decoding(policy, capacity=..., interval=...)")
        super().__post_init__()
        check_count("capacity", self.capacity, minimum=1)
        check_count("interval", self.interval, minimum=1)
        base = self.base
        if not isinstance(base, Policy):
            raise TypeError(f"Decoding needs a policy that scores tokens (H2O, TOVA, SnapKV, ...), got {base!r}")
        if self.policy.selects_after_all_layers:
            raise ValueError(
                f"Decoding evicts one layer at a time as tokens are generated; {self.policy.name} chooses after "
                "all layers (KVzip's context reconstruction, or global allocation) and cannot score during "
                "decoding; use H2O, TOVA, SnapKV or StreamingLLM"
            )
        protected = base.window_protected + base.sinks
        if self.capacity < protected:
            raise ValueError(
                f"decode capacity {self.capacity} is smaller than the {protected} protected tokens "
                f"(sinks {base.sinks} + window {base.window_protected}); raise it or shrink the window/sinks"
            )
        if self.capacity < base.chunk:
            raise ValueError(f"decode capacity {self.capacity} is smaller than the chunk {base.chunk}")

    @property
    def evicts_while_decoding(self) -> bool:
        return True

    @property
    def decode_room(self) -> int:
        """Evicted back to `capacity`, a layer takes `interval` appends before its next eviction."""
        return self.interval

    @cached_property
    def query_window(self) -> int:
        """How many of the latest queries the policy scores with during decoding (0: none, or accumulated)."""
        base = self.base
        if base.decode_accumulates or not base.takes_score:
            return 0
        return base.window_protected or 1  # SnapKV's observation window; TOVA: the newest query

    # -- prefill: the wrapped policy, plus what decoding will need --

    def select(self, layer: LayerState, scores: torch.Tensor | None = None) -> torch.Tensor | None:
        scores = self.base.token_scores(layer) if scores is None else scores
        if self.base.decode_accumulates:  # the running sums start with the prompt window's, and follow `keep`
            layer.layer.set_rider(RUNNING, scores.to(torch.promote_types(scores.dtype, torch.float32)))
        window = (layer.queries(layer.length - self.query_window, layer.length),) if self.query_window else ()
        layer.layer.policy_state = DecodeState(window, window[0].shape[-2] if window else 0)
        return self.policy.select(layer, scores)

    # -- later forwards: one path for every layout, on the layer's grid --

    def decode_step(self, cache_layer, new_queries: torch.Tensor, new_outputs: torch.Tensor | None = None) -> bool:
        """Keep the latest queries the policy scores with, and their attention outputs since the layer's last
        eviction; whether a row of the layer is due (the slots are counted only when one can be:
        `DecodeState.until`, set for after this forward's eviction too). An accumulating policy (H2O) adds every
        forward's scores: always. Runs after every layer of every decoding step: kept to a few Python operations."""
        state = cache_layer.policy_state if isinstance(cache_layer.policy_state, DecodeState) else DecodeState()
        tokens, queries, held = new_queries.shape[-2], state.queries, state.held
        window, outputs = self.query_window, ()
        if window:  # the forwards' queries as they passed, the fewest latest that cover the window
            queries, held = (*queries, new_queries), held + tokens
            while held - queries[0].shape[-2] >= window:
                held -= queries[0].shape[-2]
                queries = queries[1:]
            if new_outputs is not None:  # an eviction at the last forward changed what the earlier ones saw
                outputs = (*(state.outputs if state.due is None else ()), new_outputs)[-len(queries):]
        limit = self.capacity + self.interval
        if state.until > tokens and state.limit == limit:  # no row can be due yet (counted for these settings)
            cache_layer.policy_state = DecodeState(queries, held, state.until - tokens, None, outputs, limit)
            return self.base.decode_accumulates
        mean = _mean_slots(cache_layer, self.group)  # [B]: each row on its own
        due = mean >= limit
        evicting = bool(due.any())
        if evicting:  # the due rows will hold `capacity` per head at most (fewer real slots where padded)
            mean = mean.masked_fill(due, self.capacity)
        # the fullest row is due in `until` more tokens at the earliest
        until = int(torch.ceil(limit - mean.max()))
        cache_layer.policy_state = DecodeState(queries, held, until, due if evicting else None, outputs, limit)
        return evicting or self.base.decode_accumulates

    def decode_select(self, layer: LayerState) -> torch.Tensor | None:
        cache_layer = layer.layer
        if self.base.decode_accumulates:
            self._accumulate(layer)
        state = cache_layer.policy_state if isinstance(cache_layer.policy_state, DecodeState) else DecodeState()
        due = state.due  # [B], from `decode_step`: each row on its own
        if due is None:
            return None
        # Under tensor parallelism every rank chooses in the grid one device would: as wide as the longest head.
        view = layer.with_slots(_agreed_width(layer.length, self.group, layer.keys.device))
        recent = torch.cat(state.queries, dim=-2)[:, :, -self.query_window:] if state.queries else None
        outputs = None  # the window's attention outputs as the model computed them, if still exact (else recomputed)
        if state.queries and len(state.outputs) == len(state.queries):
            kept = torch.cat(state.outputs, dim=1)[:, -self.query_window:]  # [B, W, Hq x dv]
            heads = recent.shape[1]
            outputs = _latest(view.length, kept.view(*kept.shape[:2], heads, -1).transpose(1, 2))
        view = replace(view, outputs=outputs, queries=_latest(view.length, recent))
        raw = cache_layer.rider(RUNNING) if self.base.decode_accumulates else self.base.token_scores(view)
        if raw.shape[-1] < view.length:  # a uniform layer's rider, in a wider grid
            raw = torch.cat([raw.new_zeros(*raw.shape[:2], view.length - raw.shape[-1]), raw], dim=-1)
        return self.policy.precision(view, self._allocate(view, raw, due), raw)

    def _allocate(self, view: LayerState, raw: torch.Tensor, due: torch.Tensor) -> torch.Tensor:
        """Keep mask of the view's grid: `capacity` per head in the rows that are `due` [B], every real slot in
        the others."""
        # A due row holds more than `capacity` slots in some head; one count for all rows and ranks keeps them agreed.
        budget = torch.full((raw.shape[0],), min(self.capacity, view.length), device=raw.device)
        chosen = self.policy.allocate(self.policy.prepared_scores(view, raw), budget, view)
        real = view.key_mask if view.key_mask is not None else torch.ones_like(chosen)
        real = real.unsqueeze(1) if real.dim() == 2 else real
        return torch.where(due[:, None, None], chosen & real, real.expand_as(chosen))

    def _accumulate(self, layer: LayerState) -> None:
        """H2O: add the score of this forward's queries over the layer's slots to the running scores."""
        view = layer.with_slots()
        queries = layer.new_queries()
        outputs = layer.new_outputs() if layer.new_outputs is not None else None
        length, tokens = view.length, queries.shape[-2]
        added = self.base.saliency(queries, view.keys, view.values, layer.scaling, key_mask=view.key_mask,
                                   outputs=outputs, query_positions=range(length - tokens, length))
        running = layer.layer.rider(RUNNING)  # None: a cache not prefilled under this policy, the sums start now
        layer.layer.set_rider(RUNNING, added if running is None else running + added)


class DecodeState(NamedTuple):
    """What Decoding keeps of a layer between forwards (replaced, never changed: a forked cache shares it):

    - queries: for policies scored by their latest queries (SnapKV, TOVA), the forwards' queries [B, Hq, q, d],
      post-RoPE, as they passed, the fewest latest that cover the window (concatenated at an eviction only);
      empty for the others; held: how many queries they hold in all;
    - until: how many more tokens every row of the layer can take before any is due (a row's mean slots per KV
      head grow by at most one per token), so that most forwards skip counting the slots; 0: count now; limit:
      the capacity + interval it was counted for (a cache continued under other settings counts again);
    - due: [B] the rows due at this forward, where one is (counted by `decode_step`), else None;
    - outputs: the attention outputs [B, q, Hq x dv] of the latest forwards since the layer's last eviction (at
      most as many as `queries`): where they cover the window, the slots each query saw are all still there, and
      scoring needs no W x L product to recompute them."""

    queries: tuple[torch.Tensor, ...] = ()
    held: int = 0
    until: int = 0
    due: torch.Tensor | None = None
    outputs: tuple[torch.Tensor, ...] = ()
    limit: int = 0


#: The rider that holds an accumulating policy's running scores (H2O), per slot.
RUNNING = "running_scores"


def _latest(length: int, recent: torch.Tensor | None):
    """rows(start, end) of a layer's latest slots (`length` in all), from `recent` [B, Hq, w, ...] (their queries
    or attention outputs, kept as they passed)."""

    def queries(start: int, end: int) -> torch.Tensor:
        first = length - (recent.shape[-2] if recent is not None else 0)
        if recent is None or start < first:
            raise ValueError(f"only the latest {length - first} queries are kept, not slot {start}")
        return recent[:, :, start - first : end - first]

    return queries


def _agreed_width(width: int, group, device) -> int:
    """The longest head's slot count over every rank of `group` (this rank's alone without one)."""
    if group is None:
        return width
    longest = torch.tensor([width], device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    return int(longest)


def _mean_slots(cache_layer, group=None) -> torch.Tensor:
    """[B] real slots per KV head, averaged over the heads of each row of a layer (of every rank's heads with a
    process `group`, so that all ranks evict at the same step)."""
    lengths = cache_layer.head_lengths()  # [B, Hkv]
    if group is None:
        return lengths.sum(-1) / lengths.shape[1]
    both = torch.stack([lengths.sum(-1), torch.full_like(lengths[:, 0], lengths.shape[1])]).to(torch.float64)
    dist.all_reduce(both, group=group)
    return both[0] / both[1]
