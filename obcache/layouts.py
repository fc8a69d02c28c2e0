"""The two layouts of one cache layer: uniform (every KV head holds as many slots) and ragged.

Both record, per slot, the token's position in the row's sequence as fed
(left padding included; -1 marks a padding slot), so attention masks, kept
positions and later evictions never depend on where a slot sits.

- `UniformLayer`: keys/values [B, Hkv, n, d], positions [B, 1 or Hkv, n].
  The fast path: attention goes to the model's own sdpa/eager kernel.
- `RaggedLayer`: the slots of all (row, head) segments back to back, keys and
  values [T, d], positions [T], segment lengths S = B * Hkv. Nothing is padded
  to the longest head; bytes held are sum(kept) x d x 2 x dtype size.

A layer changes layout only through `keep(mask)`, which returns the layer
that holds the kept slots (uniform when every head keeps as many). Two
optional riders follow the slots: `scores`, a float32 running score per slot
(H2O's accumulated attention during decoding; new slots start at 0), and
`extras`, per-layer state a policy keeps across forwards (carried as is).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin


class UniformLayer(CacheLayerMixin):
    """A layer whose KV heads all hold n slots; padding slots (left padding) are shared by the heads of a row."""

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.positions: torch.Tensor | None = None  # [B, 1 or Hkv, n] int32, -1 = padding
        self.padded = False  # whether any slot is padding
        self.scores: torch.Tensor | None = None  # [B, Hkv, n] float32 running scores, or None
        self.extras: dict = {}

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.positions = torch.empty(key_states.shape[0], 1, 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, positions: torch.Tensor | None = None, *args, padded: bool | None = None,
               **kwargs):
        """Append [B, Hkv, q, d] new slots at `positions` [B, q] (int32, -1 = padding; default: after the last).

        `padded`: whether any new position is -1, if the caller knows (saves a device sync per layer).
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if positions is None:
            start = int(self.positions.max()) + 1 if self.positions.numel() else 0
            positions = torch.arange(start, start + key_states.shape[-2], dtype=torch.int32, device=self.device)
            positions = positions.expand(key_states.shape[0], -1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new = positions.to(torch.int32).unsqueeze(1).expand(-1, self.positions.shape[1], -1)
        self.positions = torch.cat([self.positions, new], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(*key_states.shape[:3])], dim=-1)
        self.padded = self.padded or (bool((positions < 0).any()) if padded is None else padded)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def slot_mask(self) -> torch.Tensor | None:
        """[B, n] bool, False for padding slots (the same in every head of a row); None if none."""
        return self.positions[:, 0] >= 0 if self.padded else None

    def attention_mask(self, query_positions: torch.Tensor, *, causal_skip: bool) -> torch.Tensor | None:
        """bool [B, 1, q, n]: slot p is seen by query i iff it is real and at or before i's position.

        None when the kernel's own causal handling is exact: no padding and one
        query, or (with `causal_skip`, sdpa's is_causal) a fresh layer.
        """
        q, n = query_positions.shape[0], self.get_seq_length()
        if not self.padded and (q == 1 or (causal_skip and q == n)):
            return None
        slots = self.positions[:, :1, None, :]  # [B, 1, 1, n]
        return (slots <= query_positions[None, None, :, None]) & (slots >= 0)

    def keep(self, mask: torch.Tensor) -> UniformLayer | RaggedLayer:
        """The layer holding the slots of `mask` [B, Hkv, n] (bool).

        Uniform when every head of every row keeps as many slots (padding
        slots included); otherwise ragged, without padding slots.
        """
        batch, heads, length = mask.shape
        counts = mask.sum(-1)
        if bool((counts == counts[0, 0]).all()):
            kept = int(counts[0, 0])
            index = mask.nonzero()[:, -1].view(batch, heads, kept)  # row-major: sorted per head
            layer = UniformLayer()
            layer.dtype, layer.device, layer.is_initialized = self.dtype, self.device, True
            gather = index.unsqueeze(-1).expand(-1, -1, -1, self.keys.shape[-1])
            layer.keys = self.keys.gather(2, gather)
            layer.values = self.values.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, self.values.shape[-1]))
            layer.positions = self.positions.expand(-1, heads, -1).gather(2, index)
            layer.padded = self.padded and bool((layer.positions < 0).any())
            layer.scores = self.scores.gather(2, index) if self.scores is not None else None
            layer.extras = self.extras
            return layer
        real = mask & (self.positions >= 0)
        layer = RaggedLayer.from_tensors(self.keys, self.values, self.positions.expand(-1, heads, -1), real)
        layer.scores = self.scores[real] if self.scores is not None else None
        layer.extras = self.extras
        return layer

    def kept_positions(self) -> list[list[torch.Tensor]]:
        """Per batch row and KV head, the sorted positions of its real slots."""
        positions = self.positions.expand(-1, self.keys.shape[1], -1)
        return [[row[row >= 0] for row in heads] for heads in positions]

    def head_lengths(self) -> torch.Tensor:
        """[B, Hkv] real slots per head."""
        return (self.positions >= 0).sum(-1).expand(-1, self.keys.shape[1])

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes if self.is_initialized else 0

    def index_nbytes(self) -> int:
        return self.positions.nbytes if self.is_initialized else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("obcache caches do not support beam search; use greedy or sampling")


class RaggedLayer(CacheLayerMixin):
    """A layer whose (row, head) segments hold different numbers of slots, back to back."""

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.positions: torch.Tensor | None = None  # [T] int32
        self.lengths: list[int] = []  # slots per segment, segment s = row s // Hkv, head s % Hkv
        self.batch = self.heads = 0
        self.padded = False
        self.scores: torch.Tensor | None = None  # [T] float32 running scores, or None
        self.extras: dict = {}

    @classmethod
    def from_tensors(cls, keys, values, positions, mask) -> RaggedLayer:
        """The slots of `mask` [B, Hkv, n] out of keys/values [B, Hkv, n, d] at `positions` [B, Hkv, n]."""
        layer = cls()
        layer.dtype, layer.device, layer.is_initialized = keys.dtype, keys.device, True
        layer.batch, layer.heads = mask.shape[:2]
        layer.keys, layer.values, layer.positions = keys[mask], values[mask], positions[mask].to(torch.int32)
        layer.lengths = mask.sum(-1).flatten().tolist()
        layer.padded = bool((layer.positions < 0).any())
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a RaggedLayer is made by eviction (UniformLayer.keep), never filled from empty")

    @property
    def offsets(self) -> list[int]:
        """Start of every segment, and the total, [S + 1]."""
        offsets = [0]
        for length in self.lengths:
            offsets.append(offsets[-1] + length)
        return offsets

    def segments(self):
        """(row, head, keys [n, d], values [n, dv], positions [n]) of every segment (views)."""
        for s, (start, length) in enumerate(zip(self.offsets, self.lengths)):
            row, head = divmod(s, self.heads)
            end = start + length
            yield row, head, self.keys[start:end], self.values[start:end], self.positions[start:end]

    def update(self, key_states, value_states, positions: torch.Tensor | None = None, *args, padded: bool | None = None,
               **kwargs):
        """Append q new slots [B, Hkv, q, d] at the end of every segment, at `positions` [B, q] (see UniformLayer)."""
        batch, heads, q = key_states.shape[:3]
        if (batch, heads) != (self.batch, self.heads):
            raise ValueError(f"new states have {batch} rows x {heads} heads, the layer {self.batch} x {self.heads}")
        if positions is None:
            start = int(self.positions.max()) + 1 if self.positions.numel() else 0
            positions = torch.arange(start, start + q, dtype=torch.int32, device=self.device).expand(batch, -1)
        self.keys = self._interleave(self.keys, key_states.reshape(batch * heads, q, -1))
        self.values = self._interleave(self.values, value_states.reshape(batch * heads, q, -1))
        new_positions = positions.to(torch.int32)[:, None, :].expand(-1, heads, -1).reshape(batch * heads, q)
        self.positions = self._interleave(self.positions, new_positions)
        if self.scores is not None:
            self.scores = self._interleave(self.scores, self.scores.new_zeros(batch * heads, q))
        self.lengths = [length + q for length in self.lengths]
        self.padded = self.padded or (bool((positions < 0).any()) if padded is None else padded)
        return self.keys, self.values

    def _interleave(self, flat: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """`flat` [T, ...] with new[s] ([S, q, ...]) appended after segment s's slots, in one copy."""
        pieces = []
        for segment, (start, length) in enumerate(zip(self.offsets, self.lengths)):
            pieces += [flat[start : start + length], new[segment].to(flat.dtype)]
        return torch.cat(pieces)

    def get_seq_length(self) -> int:
        return max(self.lengths, default=0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def keep(self, mask: torch.Tensor) -> RaggedLayer:
        """The layer holding the slots of `mask` [T] (bool, over this layer's slots)."""
        layer = RaggedLayer()
        layer.dtype, layer.device, layer.is_initialized = self.dtype, self.device, True
        layer.batch, layer.heads = self.batch, self.heads
        layer.keys, layer.values, layer.positions = self.keys[mask], self.values[mask], self.positions[mask]
        layer.lengths = [int(part.sum()) for part in mask.split(self.lengths)]
        layer.padded = self.padded and bool((layer.positions < 0).any())
        layer.scores = self.scores[mask] if self.scores is not None else None
        layer.extras = self.extras
        return layer

    def right_aligned(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(index [T], valid [B, Hkv, W]): where each slot sits in a [B, Hkv, W] grid (W = `width`, at least
        and by default the longest segment) whose segments end at the right edge, so every segment's last
        slots share columns."""
        width = self.get_seq_length() if width is None else width
        device = self.keys.device
        lengths = torch.tensor(self.lengths, device=device)
        segment = torch.arange(len(self.lengths), device=device).repeat_interleave(lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        slot = torch.arange(self.keys.shape[0], device=device) - starts[segment]
        index = segment * width + (width - lengths[segment]) + slot
        valid = torch.zeros(len(self.lengths) * width, dtype=torch.bool, device=device)
        valid[index] = True
        return index, valid.view(self.batch, self.heads, width)

    def kept_positions(self) -> list[list[torch.Tensor]]:
        rows: list[list[torch.Tensor]] = [[] for _ in range(self.batch)]
        for row, _, _, _, positions in self.segments():
            rows[row].append(positions[positions >= 0])
        return rows

    def head_lengths(self) -> torch.Tensor:
        lengths = torch.tensor([int((p >= 0).sum()) for *_, p in self.segments()]) if self.padded else torch.tensor(self.lengths)
        return lengths.view(self.batch, self.heads)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def index_nbytes(self) -> int:
        return self.positions.nbytes + 8 * len(self.lengths)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("obcache caches do not support beam search; use greedy or sampling")


