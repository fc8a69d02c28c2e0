"""UniformLayer: every KV head of a layer holds as many slots, in storage written in place."""

from __future__ import annotations

import torch

from obcache.layouts.base import Grid, Layer
from obcache.layouts.paged import PagedLayer


class UniformLayer(Layer):
    """A layer whose KV heads all hold n slots; padding slots (left padding) are shared by the heads of a row."""

    def __init__(self):
        super().__init__()
        self.length = 0
        self._keys = self._values = self._positions = None  # [B, Hkv, C, d] ..., positions [B, 1 or Hkv, C] int32

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self._keys = key_states.new_empty(batch, heads, 0, key_states.shape[-1])
        self._values = value_states.new_empty(batch, heads, 0, value_states.shape[-1])
        self._positions = torch.empty(batch, 1, 0, dtype=torch.int32, device=self.device)
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        """[B, 1 or Hkv, n] int32 positions of the slots (-1 = padding)."""
        return self._positions[..., : self.length]

    def _copy_storage(self) -> None:
        self._keys, self._values = self._keys.clone(), self._values.clone()
        self._positions = self._positions.clone()
        self.riders = {name: rider.clone() for name, rider in self.riders.items()}

    def _reserve(self, needed: int) -> None:
        """Room for `needed` slots: grows the storage by at least an eighth (one copy every so many tokens)."""
        capacity = self._keys.shape[2]
        if needed <= capacity:
            return
        more = max(needed, capacity + max(16, capacity // 8)) - capacity
        self._keys, self._values = _extended(self._keys, more, 0), _extended(self._values, more, 0)
        self._positions = _extended(self._positions, more, -1)
        self.riders = {name: _extended(rider, more, 0) for name, rider in self.riders.items()}

    def update(self, key_states, value_states, positions: torch.Tensor | None = None, *args, padded: bool | None = None,
               **kwargs):
        """Write [B, Hkv, q, d] new slots at `positions` [B, q] (int32, -1 = padding; default: after the last), in
        place. `padded`: whether any new position is -1, if the caller knows (saves a device sync per layer)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if positions is None:
            start = int(self.positions.max()) + 1 if self.length else 0
            positions = torch.arange(start, start + q, dtype=torch.int32, device=self.device)
            positions = positions.expand(key_states.shape[0], -1)
        self._own()
        self._reserve(self.length + q)
        new = slice(self.length, self.length + q)
        self._keys[:, :, new] = key_states
        self._values[:, :, new] = value_states
        self._positions[..., new] = positions.to(torch.int32).unsqueeze(1)
        for rider in self.riders.values():
            rider[:, :, new] = 0
        self.length += q
        self.padded = self.padded or (bool((positions < 0).any()) if padded is None else padded)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def slot_mask(self) -> torch.Tensor | None:
        """[B, n] bool, False for padding slots (the same in every head of a row); None if none."""
        return self.positions[:, 0] >= 0 if self.padded else None

    def attention_mask(self, query_positions: torch.Tensor, *, causal_skip: bool) -> torch.Tensor | None:
        """bool [B, 1, q, n]: slot p is seen by query i iff it is real and at or before i's position.

        None when the kernel's own causal handling is exact: no padding and one
        query, or (with `causal_skip`, sdpa's is_causal) a fresh layer.
        """
        q, n = query_positions.shape[0], self.length
        if not self.padded and (q == 1 or (causal_skip and q == n)):
            return None
        slots = self.positions[:, :1, None, :]  # [B, 1, 1, n]
        return (slots <= query_positions[None, None, :, None]) & (slots >= 0)

    def grid(self, width: int | None = None) -> Grid:
        heads = self.keys.shape[1]
        positions = self.positions.expand(-1, heads, -1)
        grid = Grid(self.keys, self.values, positions >= 0, positions)
        pad = 0 if width is None else width - self.length
        if pad <= 0:
            return grid
        left = lambda x, fill: torch.cat([x.new_full((*x.shape[:2], pad, *x.shape[3:]), fill), x], 2)  # noqa: E731
        return Grid(left(grid.keys, 0), left(grid.values, 0), left(grid.valid, False), left(grid.positions, -1))

    def rider(self, name: str) -> torch.Tensor | None:
        rider = self.riders.get(name)
        return rider[:, :, : self.length] if rider is not None else None

    def set_rider(self, name: str, grid: torch.Tensor) -> None:
        self._own()
        if name not in self.riders:
            self.riders[name] = grid.new_zeros(*self._keys.shape[:3])
        self.riders[name][:, :, : self.length] = grid

    def keep(self, mask: torch.Tensor, room: int = 0) -> UniformLayer | PagedLayer:
        """The layer holding the slots of `mask` [B, Hkv, n] (bool; a wider grid, right-aligned, is cut to its last
        n columns).

        Uniform when every head of every row keeps as many slots (padding slots included): in new storage of
        their size plus `room` slots for the appends to come when the eviction frees more than a quarter of the
        storage (the prompt's), else moved to the front of this layer's own storage, in place (a decoding
        interval's: no new memory, and room for the next appends); otherwise paged, without padding slots.
        """
        mask = mask[..., mask.shape[-1] - self.length:]
        batch, heads, _ = mask.shape
        counts = mask.sum(-1)
        if bool((counts == counts[0, 0]).all()):
            kept = int(counts[0, 0])
            capacity, where = self._keys.shape[2], mask.nonzero()  # row-major: sorted per head
            flat = (where[:, 0] * heads + where[:, 1]) * capacity + where[:, 2]  # in the storage [B * Hkv * capacity]
            take = lambda x: x.reshape(batch * heads * capacity, -1).index_select(0, flat).view(batch, heads, kept, -1)  # noqa: E731
            keys, values = take(self._keys), take(self._values)
            positions = take(self._positions.expand(-1, heads, -1))[..., 0]
            riders = {name: take(rider)[..., 0] for name, rider in self.riders.items()}
            if 4 * (capacity - kept) <= capacity and not self._shared:
                self._keys[:, :, :kept], self._values[:, :, :kept] = keys, values
                self._positions = self._positions.expand(-1, heads, -1).clone() if self._positions.shape[1] < heads \
                    else self._positions
                self._positions[:, :, :kept] = positions
                for name, rider in riders.items():
                    self.riders[name][:, :, :kept] = rider
                self.length = kept
                self.padded = self.padded and bool((positions < 0).any())
                return self
            layer = UniformLayer()
            layer.dtype, layer.device, layer.is_initialized = self.dtype, self.device, True
            layer.padded = self.padded and bool((positions < 0).any())
            if room:
                keys, values = _extended(keys, room, 0), _extended(values, room, 0)
                positions = _extended(positions, room, -1)
                riders = {name: _extended(rider, room, 0) for name, rider in riders.items()}
            layer._keys, layer._values, layer._positions, layer.riders = keys, values, positions, riders
            layer.length = kept
            layer.policy_state = self.policy_state
            return layer
        grid = self.grid()
        layer = PagedLayer.from_grid(grid, mask & grid.valid, {name: self.rider(name) for name in self.riders})
        layer.policy_state = self.policy_state
        return layer

    def head_lengths(self) -> torch.Tensor:
        """[B, Hkv] real slots per head."""
        if not self.padded:
            return torch.full(self._keys.shape[:2], self.length, device=self.device)
        return (self.positions >= 0).sum(-1).expand(-1, self.keys.shape[1])

    def nbytes(self) -> int:
        """Bytes of the key and value storage held (unused room included)."""
        return self._keys.nbytes + self._values.nbytes if self.is_initialized else 0

    def index_nbytes(self) -> int:
        return self._positions.nbytes + sum(rider.nbytes for rider in self.riders.values()) if self.is_initialized else 0


def _extended(storage: torch.Tensor, count: int, fill) -> torch.Tensor:
    """`storage` [B, H, C, ...] with `count` more slots of `fill` after its C."""
    return torch.cat([storage, storage.new_full((*storage.shape[:2], count, *storage.shape[3:]), fill)], 2)
