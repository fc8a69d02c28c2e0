"""What the hooks hand to a policy, and what they need back: a leaf module (torch only).

`LayerState` is one attention layer right after a forward, as the model
computed it; `Selector` is the small protocol the hooks call. Policies, the
head/layer budget wrappers and the evaluation's recorders all meet here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch


@dataclass
class LayerState:
    """One attention layer after the forward that filled its cache, as a policy sees it.

    keys, values: [B, Hkv, L, d] (keys post-RoPE), the layer's cached tokens.
    scaling: the module's logit scale.
    query_heads: Hq, the number of query heads (a multiple of Hkv).
    key_mask: [B, L] bool, False for padding slots; None if no padding. A
        per-head [B, Hkv, L] mask only for shape-only views of ragged layers.
    queries: queries(start, end) -> [B, Hq, end - start, d], post-RoPE queries of
        cache slots start..end-1 (tokens of this forward), recomputed on demand.
    outputs: outputs(start, end) -> [B, Hq, end - start, dv], the attention
        outputs o_i the model computed for those slots (captured during the
        forward), or None: the scores then recompute them.
    layer_idx, num_layers: where the layer sits in the model (per-layer budgets).
    layer: the cache layer itself (`obcache.layouts`), for policies that keep
        state across forwards (decoding-time eviction); None for synthetic states.
    new_queries, new_outputs: () -> [B, Hq, q, d], the queries and attention
        outputs of this forward's q tokens, whatever the layer's layout.
    rotate: rotate(x, offset) -> x, post-RoPE vectors [B, H, W, d] moved
        `offset` positions later with the model's RoPE; None if unknown.
    new_log_normalizers: [B, Hq, q] log sum_p exp(z_ip) of this forward's
        queries over every key they saw, where the attention kernel gave them
        (asked for with `EvictableCache.log_normalizers`); else None.
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


@runtime_checkable
class Selector(Protocol):
    """What the eviction hooks need from a policy (or a budget wrapper around one)."""

    name: str
    needs_reconstruction: bool  # scored by the queries of the model repeating the context (KVzip)
    selects_after_all_layers: bool  # chooses with select_layers once every layer is filled

    def check_ready(self) -> None:
        """Raise a clear ValueError if the policy must first be prepared (`obcache.calibrate`)."""

    # optional (absent: None, False): the torch.distributed process group of the ranks that hold the KV heads
    # (tensor parallelism), and whether one head's kept tokens depend on the other heads' scores
    group: object | None
    chooses_across_heads: bool

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        """Raise a clear ValueError, before any model work, if prompts of these real lengths cannot be evicted."""

    def select(self, layer: LayerState) -> torch.Tensor | None:
        """After the prefill: keep mask [B, Hkv, L] (bool) of the layer's slots, or None to keep them all."""

    def select_layers(self, layers: list[LayerState], scores: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """After the whole prefill (selectors that select after all layers): every layer's keep mask."""

    def decode_select(self, layer: LayerState) -> torch.Tensor | None:
        """After any later forward: keep mask of the layer's slots ([B, Hkv, n] uniform, [T] ragged), or None.

        Optional: only selectors that evict during decoding (`obcache.Decoding`) define it; the hooks
        skip the others after the prefill."""
