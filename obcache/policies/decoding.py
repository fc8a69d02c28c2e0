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
  generated token's query as it passes: `layer.scores`);
- TOVA: the newest query alone;
- SnapKV: the last `window` queries (kept post-RoPE as they pass), pooled;
- StreamingLLM: sinks and the most recent tokens.

Scores use the queries and attention outputs of the forwards as they pass,
and never build an L x L matrix; eviction every `interval` steps amortises the
scoring and the copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.distributed as dist

from obcache.layer_state import LayerState
from obcache.layouts import RaggedLayer
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
    def query_window(self) -> int:
        """How many of the latest queries the policy scores with during decoding (0: none, or accumulated)."""
        base = self.base
        if base.decode_accumulates or not base.takes_score:
            return 0
        return base.window_protected or 1  # SnapKV's observation window; TOVA: the newest query

    # -- prefill: the wrapped policy, plus what decoding will need --

    def select(self, layer: LayerState, scores: torch.Tensor | None = None) -> torch.Tensor | None:
        scores = self.base.token_scores(layer) if scores is None else scores
        if self.base.decode_accumulates:
            layer.layer.scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # follows `keep`
        if self.query_window:
            layer.layer.extras["queries"] = layer.queries(layer.length - self.query_window, layer.length)
        kept = self.policy.layer_budget(layer)
        if bool((kept >= layer.real_lengths()).all()):
            return None
        return self.policy.allocate(self.policy.prepared_scores(layer, scores), kept, layer)

    # -- later forwards --

    def decode_select(self, layer: LayerState) -> torch.Tensor | None:
        cache_layer = layer.layer
        if self.base.decode_accumulates:
            self._accumulate(layer)
        elif self.query_window:
            recent = layer.new_queries()
            if "queries" in cache_layer.extras:
                recent = torch.cat([cache_layer.extras["queries"], recent], dim=-2)
            cache_layer.extras["queries"] = recent[:, :, -self.query_window :]
        due = _mean_slots(cache_layer, self.group) >= self.capacity + self.interval  # [B]: each row on its own
        if not bool(due.any()):
            return None
        # Under tensor parallelism every rank chooses in the grid one device would: as wide as the longest head.
        width = _agreed_width(cache_layer.get_seq_length(), self.group, cache_layer.keys.device)
        if isinstance(cache_layer, RaggedLayer):
            index, valid = cache_layer.right_aligned(width)
            scores = self._ragged_scores(layer)
            grid = scores.new_zeros(valid.numel())
            grid[index] = scores
            mask = self._allocate(_grid_view(layer, valid), grid.view_as(valid), due)
            return mask.reshape(-1)[index]
        view = replace(layer, queries=_buffered_queries(layer.length, cache_layer.extras.get("queries")), outputs=None)
        raw = cache_layer.scores if self.base.decode_accumulates else self.base.token_scores(view)
        if width == view.length:
            return self._allocate(view, raw, due)
        pad = width - view.length  # another rank holds longer heads: right-align this rank's in the wider grid
        real = view.key_mask if view.key_mask is not None else raw.new_ones(raw.shape[0], view.length, dtype=torch.bool)
        valid = torch.cat([real.new_zeros(*real.shape[:-1], pad), real], dim=-1).expand(*raw.shape[:2], width)
        wide = torch.cat([raw.new_zeros(*raw.shape[:-1], pad), raw], dim=-1)
        return self._allocate(_grid_view(view, valid), wide, due)[..., pad:]

    def _allocate(self, view: LayerState, raw: torch.Tensor, due: torch.Tensor) -> torch.Tensor:
        """Keep mask of the view's slots: `capacity` per head in the rows that are `due` [B], every real slot in
        the others."""
        # A due row holds more than `capacity` slots in some head; one count for all rows and ranks keeps them agreed.
        budget = torch.full((raw.shape[0],), min(self.capacity, view.length), device=raw.device)
        chosen = self.policy.allocate(self.policy.prepared_scores(view, raw), budget, view)
        real = view.key_mask if view.key_mask is not None else torch.ones_like(chosen)
        real = real.unsqueeze(1) if real.dim() == 2 else real
        return torch.where(due[:, None, None], chosen & real, real.expand_as(chosen))

    def _segments(self, layer: LayerState):
        """(row, head query slice, segment state) of every segment of a ragged layer."""
        cache_layer: RaggedLayer = layer.layer
        group = layer.query_heads // cache_layer.heads
        for row, head, keys, values, positions in cache_layer.segments():
            heads = slice(head * group, (head + 1) * group)
            mask = (positions >= 0)[None] if cache_layer.padded else None
            yield row, heads, replace(
                layer, keys=keys[None, None], values=values[None, None], key_mask=mask, query_heads=group, outputs=None,
            )

    def _ragged_scores(self, layer: LayerState) -> torch.Tensor:
        """[T] raw scores of a ragged layer's slots: the running sums, or the policy's score per segment."""
        cache_layer: RaggedLayer = layer.layer
        if self.base.decode_accumulates:
            return cache_layer.scores
        recent = cache_layer.extras.get("queries")
        parts = []
        for row, heads, segment in self._segments(layer):
            if recent is not None:
                segment = replace(segment, queries=_buffered_queries(segment.length, recent[row : row + 1, heads]))
            parts.append(self.base.token_scores(segment)[0, 0])
        return torch.cat(parts)

    def _accumulate(self, layer: LayerState) -> None:
        """H2O: add the score of this forward's queries over the current slots to the running scores."""
        base, cache_layer = self.base, layer.layer
        queries, outputs = layer.new_queries(), layer.new_outputs() if layer.new_outputs is not None else None
        tokens = queries.shape[-2]

        def score(q, o, keys, values, key_mask):
            length = keys.shape[-2]
            return base.saliency(q, keys, values, layer.scaling, key_mask=key_mask, outputs=o,
                                 query_positions=range(length - tokens, length))

        if cache_layer.scores is None:  # a cache not prefilled under this policy: sums start now
            size = cache_layer.keys.shape[0] if isinstance(cache_layer, RaggedLayer) else layer.keys.shape[:3]
            cache_layer.scores = torch.zeros(size, device=queries.device, dtype=torch.promote_types(queries.dtype, torch.float32))
        if not isinstance(cache_layer, RaggedLayer):
            cache_layer.scores += score(queries, outputs, layer.keys, layer.values, layer.key_mask)
            return
        parts = []
        for row, heads, segment in self._segments(layer):
            o = outputs[row : row + 1, heads] if outputs is not None else None
            parts.append(score(queries[row : row + 1, heads], o, segment.keys, segment.values, segment.key_mask)[0, 0])
        cache_layer.scores += torch.cat(parts)


def _buffered_queries(length: int, recent: torch.Tensor | None):
    """queries(start, end) of a layer's latest slots (`length` in all), from `recent` [B, Hq, w, d] kept as they passed."""

    def queries(start: int, end: int) -> torch.Tensor:
        first = length - (recent.shape[-2] if recent is not None else 0)
        if recent is None or start < first:
            raise ValueError(f"only the latest {length - first} queries are kept, not slot {start}")
        return recent[:, :, start - first : end - first]

    return queries


def _grid_view(layer: LayerState, valid: torch.Tensor) -> LayerState:
    """The layer as a [B, Hkv, W] grid of slots (`valid` marks the real ones) for choosing among given scores."""
    empty = layer.keys.new_empty(*valid.shape, 0)
    return replace(layer, keys=empty, values=empty, key_mask=valid)


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
    lengths = cache_layer.head_lengths().to(cache_layer.keys.device, torch.float64)  # [B, Hkv]
    both = torch.stack([lengths.sum(-1), torch.full_like(lengths[:, 0], lengths.shape[1])])
    if group is not None:
        dist.all_reduce(both, group=group)
    return both[0] / both[1]
