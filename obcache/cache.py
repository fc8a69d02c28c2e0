"""A transformers `Cache` whose layers can shrink to the tokens a policy keeps.

After eviction a layer holds fewer slots than the tokens the model has seen,
and its KV heads may hold different numbers of slots. The cache keeps the two
lengths apart:

- `get_seq_length()` is the *logical* length, the tokens seen so far, as
  transformers' `generate` expects: continuing on the cache (another
  `generate` call, a new chat turn) feeds only the new tokens, at their true
  positions;
- each layer's slots (`layouts/`) carry the position of the token they hold,
  from which the attention masks are built (`attention.py`).

Evicted caches are read by obcache's attention function only: use them under
`policy.attach(model)` (or `obcache.attach(model)`); elsewhere `update` raises.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache

from obcache.layouts import UniformLayer
from obcache.layouts import MixedLayer
from obcache.selector import Widths


class EvictableCache(Cache):
    """Per-layer uniform or paged slots plus the logical length; one instance per generation.

    Attributes:
        seen_tokens: logical length (tokens fed to the model so far, padding included).
        left_padding: [B] padding tokens before each row's prompt, or None.
        full_bytes: key and value bytes the evicted layers held before their first eviction.
        eviction_seconds: time spent scoring and evicting.
    """

    def __init__(self, config=None):  # config: accepted for DynamicCache compatibility
        super().__init__(layer_class_to_replicate=UniformLayer)
        self.seen_tokens = 0
        self.left_padding: torch.Tensor | None = None
        self.evicted_layers: set[int] = set()
        self.full_bytes = 0
        self.eviction_seconds = 0.0
        # The slots the next forward appends: [B, q] int32 positions (-1 = padding) and whether any is padding;
        # set by `begin_forward` (obcache's hooks), taken by layer 0's `update`, used by every layer.
        self._incoming: tuple[torch.Tensor, bool] | None = None
        self._appending: tuple[torch.Tensor, bool] | None = None

    # -- one forward --

    def begin_forward(self, attention_mask: torch.Tensor | None, batch: int, query_length: int, device) -> torch.Tensor:
        """Record the new tokens of a forward: their positions and which are padding (2-D mask over seen + new).
        Returns their logical positions [q]."""
        if attention_mask is not None:
            if attention_mask.shape[-1] != self.seen_tokens + query_length:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} tokens, but the cache has seen "
                    f"{self.seen_tokens} and {query_length} are new"
                )
            if self.seen_tokens == 0:
                self._record_padding(attention_mask)
        positions = torch.arange(self.seen_tokens, self.seen_tokens + query_length, device=device)
        new = positions.to(torch.int32).expand(batch, -1)
        padded = attention_mask is not None and not bool(attention_mask[:, -query_length:].all())
        if padded:
            new = new.masked_fill(~attention_mask[:, -query_length:].bool().to(device), -1)
        self._incoming = (new, padded)
        return positions

    def _record_padding(self, mask: torch.Tensor) -> None:
        """Only left padding is allowed in a prompt."""
        mask = mask.bool()
        if bool(mask.all()):
            return
        if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
            raise ValueError(
                "attention_mask has padding after real tokens (right padding or holes); "
                "obcache needs left padding: set tokenizer.padding_side = 'left'"
            )
        self.left_padding = (~mask).sum(-1)

    def positions_for(self, query_length: int, device: torch.device) -> torch.Tensor:
        """RoPE positions [B or 1, q] of the next tokens: they continue from the logical length."""
        positions = torch.arange(self.seen_tokens, self.seen_tokens + query_length, device=device).unsqueeze(0)
        if self.left_padding is not None:
            positions = positions - self.left_padding.to(device).unsqueeze(-1)
        return positions

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            if self._incoming is None:  # a forward outside obcache's hooks
                if self.evicted_layers:
                    raise RuntimeError(
                        "this EvictableCache holds evicted layers, which only obcache's attention can read: "
                        "continue under `policy.attach(model)` or `obcache.attach(model)`"
                    )
                self.begin_forward(None, key_states.shape[0], key_states.shape[-2], key_states.device)
            self._appending, self._incoming = self._incoming, None
            self.seen_tokens += key_states.shape[-2]
        while len(self.layers) <= layer_idx:
            self.layers.append(UniformLayer())
        positions, padded = self._appending
        return self.layers[layer_idx].update(key_states, value_states, positions, padded=padded)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The logical length: tokens seen so far (not the slots held)."""
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if layer_idx >= len(self.layers):
            return query_length, 0
        return self.layers[layer_idx].get_mask_sizes(query_length)

    # -- eviction --

    def keep(self, layer_idx: int, mask: torch.Tensor | Widths | None, room: int = 0) -> None:
        """Keep, in layer `layer_idx`, the slots of `mask` [B, Hkv, W] (in the layer's grid, `layouts.Grid`), or store
        them at `Widths` (`packed.MixedLayer`); None keeps every slot (the layer is recorded as visited). The
        dropped slots are freed; `room`: slots per KV head to hold for the appends before the next eviction.
        """
        layer = self.layers[layer_idx]
        if layer_idx not in self.evicted_layers:
            self.full_bytes += layer.nbytes()
            self.evicted_layers.add(layer_idx)
        if isinstance(mask, Widths) and not isinstance(layer, MixedLayer):
            self.layers[layer_idx] = MixedLayer.from_grid(layer.grid(), mask,
                                                          {name: layer.rider(name) for name in layer.rider_names()})
            self.layers[layer_idx].policy_state = layer.policy_state
        elif mask is not None:
            self.layers[layer_idx] = layer.keep(mask, room)

    def fork(self) -> EvictableCache:
        """A cache that continues from this one as it is now, leaving this one unchanged.

        The two share the slots held now; a layer is copied when either side
        first writes to it (copy on write). Many questions on one compressed
        context: fork the compressed cache for each.
        """
        twin = copy.copy(self)
        twin.layers = [layer.fork() for layer in self.layers]
        twin.evicted_layers = set(self.evicted_layers)
        return twin

    def subset(self, masks: list[torch.Tensor | None]) -> EvictableCache:
        """A new cache holding, per layer, the slots of `masks[layer]` (None = all) of this one.

        Lets one prefill serve many policies: record each policy's choice, then
        build each one's evicted cache from the shared full cache.
        """
        evicted = EvictableCache()
        evicted.seen_tokens, evicted.left_padding = self.seen_tokens, self.left_padding
        for layer_idx, (layer, mask) in enumerate(zip(self.layers, masks)):
            evicted.layers.append(layer.fork())  # shares the slots until written
            evicted.keep(layer_idx, mask)
        return evicted

    # -- introspection --

    def kept_positions(self, layer_idx: int) -> list[list[torch.Tensor]]:
        """For each batch row and KV head, the sorted positions of the tokens it holds (prompt and generated).

        Positions count from the row's first real token (its RoPE positions
        when the batch is left-padded); padding slots are left out.
        """
        rows = self.layers[layer_idx].kept_positions()
        if self.left_padding is None:
            return [[heads.long() for heads in row] for row in rows]
        return [[heads.long() - int(pad) for heads in row] for row, pad in zip(rows, self.left_padding.tolist())]

    def head_lengths(self, layer_idx: int) -> torch.Tensor:
        """[B, Hkv] real tokens held by each KV head of a layer."""
        return self.layers[layer_idx].head_lengths()

    def kept_tokens(self) -> list[float]:
        """Mean real tokens per KV head in each layer."""
        return [float(self.head_lengths(i).float().mean()) for i in range(len(self.layers))]

    def is_ragged(self, layer_idx: int) -> bool:
        """Whether the layer's KV heads hold different numbers of slots (its paged layout)."""
        return not self.layers[layer_idx].uniform

    def nbytes(self) -> int:
        """Every byte the cache holds: its keys and values (`kv_nbytes`) and their index (`index_nbytes`)."""
        return self.kv_nbytes() + self.index_nbytes()

    def kv_nbytes(self) -> int:
        """Bytes of key and value storage held by every layer (what eviction frees), room for appends included:
        floats, or packed codes with their scales and zeros (`layouts.MixedLayer`)."""
        return sum(layer.nbytes() for layer in self.layers)

    def index_nbytes(self) -> int:
        """Bytes of the slot bookkeeping (positions, block tables, segment lengths, riders)."""
        return sum(layer.index_nbytes() for layer in self.layers)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("obcache caches do not support beam search; use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("obcache caches cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError("obcache caches do not support num_return_sequences > 1 or beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("obcache caches do not support selecting batch rows")
