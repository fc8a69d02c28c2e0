"""What the engine hands to a policy: one attention layer right after a forward (a leaf module, torch only).

Policies, the head/layer budget wrappers and the layer observers all meet here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch


@dataclass
class LayerState:
    """One attention layer after the forward that filled its cache, as a policy sees it.

    keys, values: [B, Hkv, L, d] (keys post-RoPE), the layer's cached tokens.
    scaling: the module's logit scale.
    query_heads: Hq, the number of query heads (a multiple of Hkv).
    key_mask: [B, L] bool, False for padding slots; None if no padding; or per
        head [B, Hkv, L] for grids of paged layers (`with_slots`).
    queries: queries(start, end) -> [B, Hq, end - start, d], post-RoPE queries of
        cache slots start..end-1 (tokens of this forward): those the attention
        function received, or rebuilt from the module's input if it did not run.
    outputs: outputs(start, end) -> [B, Hq, end - start, dv], the attention
        outputs o_i the model computed for those slots (captured during the
        forward), or None: the scores then recompute them.
    layer_idx, num_layers: where the layer sits in the model (per-layer budgets).
    layer: the cache layer itself (`obcache.layouts`): its `grid()`, riders and
        `policy_state`, for policies that keep state across forwards
        (decoding-time eviction); None for synthetic states.
    new_queries, new_outputs: () -> [B, Hq, q, d], the queries and attention
        outputs of this forward's q tokens, whatever the layer's layout.
    rotate: rotate(x, offset) -> x, post-RoPE vectors [B, H, W, d] moved
        `offset` positions later with the model's RoPE; None if unknown.
    new_log_normalizers: [B, Hq, q] log sum_p exp(z_ip) of this forward's
        queries over every key they saw, where the attention kernel gave them
        (asked for by an observer's `wants_log_normalizers`); else None.
    """

    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    query_heads: int
    key_mask: torch.Tensor | None
    queries: Callable[[int, int], torch.Tensor]
    outputs: Callable[[int, int], torch.Tensor] | None = None
    layer_idx: int = 0
    num_layers: int = 1
    layer: object | None = None
    new_queries: Callable[[], torch.Tensor] | None = None
    new_outputs: Callable[[], torch.Tensor | None] | None = None
    rotate: Callable[[torch.Tensor, int], torch.Tensor] | None = None
    new_log_normalizers: torch.Tensor | None = None

    @classmethod
    def of_cached(cls, layer, layer_idx: int, num_layers: int) -> "LayerState":
        """The state of a uniform cache layer between forwards: its tokens, no queries (scores come from elsewhere)."""

        def no_queries(start: int, end: int) -> torch.Tensor:
            raise ValueError("this layer state has no queries: its scores were computed before")

        return cls(keys=layer.keys, values=layer.values, scaling=1.0, query_heads=layer.keys.shape[1],
                   key_mask=layer.slot_mask(), queries=no_queries, layer_idx=layer_idx, num_layers=num_layers,
                   layer=layer)

    def with_slots(self, width: int | None = None) -> LayerState:
        """This state with the layer's keys and values as a grid `width` columns wide (default: the longest head;
        segments right-aligned, `layouts.Grid`): a shape-only view (a paged layer after its prefill) gets them
        gathered, a uniform layer is padded on the left if `width` is wider. Itself when nothing changes."""
        if self.layer is None or (self.keys.shape[-1] > 0 and (width is None or width == self.length)):
            return self
        grid = self.layer.grid(width)
        return replace(self, keys=grid.keys, values=grid.values, key_mask=grid.valid)

    def window(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(queries, outputs or None) of slots start..end-1."""
        return self.queries(start, end), self.outputs(start, end) if self.outputs is not None else None

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    def real_lengths(self) -> torch.Tensor:
        """[B] real (non-padding) tokens per row (of its longest head with a per-head key mask)."""
        if self.key_mask is None:
            return torch.full((self.keys.shape[0],), self.length, device=self.keys.device)
        lengths = self.key_mask.sum(-1)
        return lengths if lengths.dim() == 1 else lengths.amax(-1)

    def longest(self) -> int:
        """Real tokens of the longest row."""
        return self.length if self.key_mask is None else int(self.real_lengths().max())

    def starts(self) -> torch.Tensor:
        """[B, 1] (or [B, Hkv] with a per-head key mask) slot of each row's (head's) first real token: real
        slots are the last ones (left padding; right-aligned grids of ragged layers)."""
        if self.key_mask is None:
            return torch.zeros(self.keys.shape[0], 1, dtype=torch.long, device=self.keys.device)
        starts = (~self.key_mask).sum(-1)
        return starts.unsqueeze(-1) if starts.dim() == 1 else starts
