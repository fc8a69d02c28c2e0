"""A transformers `DynamicCache` that can shrink to the tokens a policy keeps.

Eviction keeps a different set of tokens for every KV head, so after it the
cache is shorter than the number of tokens the model has seen. Two lengths are
tracked:

- the *physical* length (`get_seq_length()`): cached slots, which attention
  masks must match;
- the *logical* length (`seen_tokens`): tokens seen so far, from which new
  tokens take their RoPE positions.

Keys and values stay [B, Hkv, kept, d], never repeated to the query heads, in
original position order. Left padding of a batch is tracked by `slot_mask`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class EvictableCache(DynamicCache):
    """`DynamicCache` plus eviction bookkeeping; one instance per generation.

    Attributes:
        seen_tokens: logical length (tokens fed to the model so far).
        prompt_mask: [B, prompt length] bool, False for left padding; None when
            no row is padded.
        slot_mask: the same over physical slots (after eviction and new tokens).
        left_padding: [B] number of padding tokens before each row's prompt.
        full_bytes: bytes the evicted layers held before eviction.
        eviction_seconds: time spent scoring and evicting.
    """

    def __init__(self, config=None):
        super().__init__(config=config)
        self.seen_tokens = 0
        self.prompt_mask: torch.Tensor | None = None
        self.slot_mask: torch.Tensor | None = None
        self.left_padding: torch.Tensor | None = None
        self.evicted_layers: set[int] = set()
        self.full_bytes = 0
        self.eviction_seconds = 0.0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            self.seen_tokens += key_states.shape[-2]
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # -- prompt bookkeeping (called before the forward that fills the cache) --

    def start(self, attention_mask: torch.Tensor | None) -> None:
        """Record the prompt's padding. Only left padding is allowed."""
        if attention_mask is None or bool(attention_mask.all()):
            return
        mask = attention_mask.bool()
        # Left padding: once a row has a real token, all later tokens are real.
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise ValueError(
                "attention_mask has padding after real tokens (right padding or holes); "
                "obcache needs left padding: set tokenizer.padding_side = 'left'"
            )
        self.prompt_mask = self.slot_mask = mask
        self.left_padding = (~mask).sum(-1)

    def attention_mask_for(self, attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
        """Turn a logical 2-D mask (seen + new tokens) into one over physical slots."""
        if attention_mask is not None and attention_mask.shape[-1] != self.seen_tokens + query_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} tokens, but the cache has seen "
                f"{self.seen_tokens} and {query_length} are new"
            )
        if self.slot_mask is None and (attention_mask is None or bool(attention_mask[:, -query_length:].all())):
            return None
        batch = self.slot_mask.shape[0] if self.slot_mask is not None else attention_mask.shape[0]
        device = self.slot_mask.device if self.slot_mask is not None else attention_mask.device
        past = self.slot_mask
        if past is None:
            past = torch.ones(batch, self.get_seq_length(), dtype=torch.bool, device=device)
        new = (
            attention_mask[:, -query_length:].bool()
            if attention_mask is not None
            else torch.ones(batch, query_length, dtype=torch.bool, device=device)
        )
        self.slot_mask = torch.cat([past, new.to(device)], dim=-1)
        return self.slot_mask

    def positions_for(self, query_length: int, device: torch.device) -> torch.Tensor:
        """RoPE positions [B or 1, q] of the next tokens: they continue from the logical length."""
        positions = torch.arange(self.seen_tokens, self.seen_tokens + query_length, device=device).unsqueeze(0)
        if self.left_padding is not None:
            positions = positions - self.left_padding.to(device).unsqueeze(-1)
        return positions

    # -- eviction --

    def keep(self, layer_idx: int, indices: torch.Tensor) -> None:
        """Keep, in layer `layer_idx`, the tokens at `indices` [B, Hkv, kept] (sorted) of each KV head.

        The new tensors are compact copies: the full-length ones are freed.
        """
        layer = self.layers[layer_idx]
        self.full_bytes += layer.keys.nbytes + layer.values.nbytes
        gather_index = indices.unsqueeze(-1).expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, gather_index)
        layer.values = layer.values.gather(2, gather_index)
        self.evicted_layers.add(layer_idx)
        if self.prompt_mask is not None:
            # Left padding sorts first, and every head of a row keeps the same
            # number of padding slots, so head 0 gives the row's slot mask.
            self.slot_mask = self.prompt_mask.gather(1, indices[:, 0])

    def subset(self, indices: list[torch.Tensor | None]) -> "EvictableCache":
        """A new cache holding, per layer, the tokens at `indices[layer]` (None = all) of this full cache.

        Lets one prefill serve many policies: record each policy's choice, then
        build each one's evicted cache from the shared full cache.
        """
        evicted = EvictableCache()
        evicted.prompt_mask = evicted.slot_mask = self.prompt_mask
        evicted.left_padding = self.left_padding
        for layer_idx, (layer, chosen) in enumerate(zip(self.layers, indices)):
            evicted.update(layer.keys, layer.values, layer_idx)
            if chosen is None:
                evicted.mark_kept_all(layer_idx)
            else:
                evicted.keep(layer_idx, chosen)
        evicted.seen_tokens = self.seen_tokens
        return evicted

    def mark_kept_all(self, layer_idx: int) -> None:
        """Record that layer `layer_idx` was visited and kept every token."""
        layer = self.layers[layer_idx]
        self.full_bytes += layer.keys.nbytes + layer.values.nbytes
        self.evicted_layers.add(layer_idx)

    # -- reporting --

    def nbytes(self) -> int:
        """Bytes held by all cached keys and values."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)

    def kept_tokens(self) -> list[int]:
        """Physical tokens per KV head in each layer."""
        return [layer.get_seq_length() for layer in self.layers]
