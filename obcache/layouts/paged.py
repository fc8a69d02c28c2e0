"""PagedLayer: every (row, KV head) segment holds any number of slots, in blocks of a per-layer pool."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

import obcache.kernels as kernels
from obcache.layouts.base import Grid, Layer, right_aligned


class Blocks(NamedTuple):
    """What the decoding kernel reads of a paged pool: keys/values [N, block, d] in the query's dtype, positions
    [N, block] int32 (a slot is attended iff its position is >= 0: empty, planned and padding slots hold -1) and
    route [N] (each block's segment)."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    route: torch.Tensor


class FloatStore:
    """Keys (or values) of a block pool as floats [N, block, d] in one dtype (the model's, or 16 bits)."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def dim(self) -> int:
        return self.data.shape[-1]

    def read(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows [n, d] of the pool slots `flat` [n]."""
        return self.data.view(-1, self.data.shape[-1])[flat]

    def write(self, flat: torch.Tensor, rows: torch.Tensor) -> None:
        self.data.view(-1, self.data.shape[-1]).index_copy_(0, flat, rows.reshape(len(flat), -1).to(self.dtype))

    def blocks(self, dtype: torch.dtype) -> torch.Tensor:
        """[N, block, d] as `dtype` (a view when it is the stored one)."""
        return self.data.to(dtype)

    def grow(self, count: int) -> None:
        self.data = torch.cat([self.data, self.data.new_zeros(count, *self.data.shape[1:])])

    def clone(self) -> FloatStore:
        return FloatStore(self.data.clone())

    def take(self, blocks: torch.Tensor) -> None:
        """Keep only `blocks` [n] (block ids), in that order: the pool shrinks to n blocks."""
        self.data = self.data[blocks]

    def nbytes(self) -> int:
        return self.data.nbytes


def block_size(mean_length: float) -> int:
    """The pool's block size for segments of `mean_length` slots on average: the power of two nearest below 5%
    of it, within [4, 128], so the partly filled last blocks waste ~2.5% of the bytes at most on average."""
    return min(128, max(4, 2 ** int(math.log2(max(1.0, 0.05 * mean_length)))))


class PagedLayer(Layer):
    """A layer whose (row, KV head) segments hold any number of slots, in blocks of a per-layer pool.

    keys/values: stores of [N, block, d] (`FloatStore`, or packed codes); positions [N, block] int32 (-1 = empty); owner [N] (the block's segment,
    -1 free); table [S, M] (each segment's blocks in order, -1 past its last); lengths [S]; segment
    s = row s // Hkv, head s % Hkv. For the decoding kernel (`attention.decode_blocks`, `kernels.paged_decode`):
    route [N], the owner (free blocks: segment 0, to which they add nothing: their positions are -1).
    Appends are planned `block` steps ahead (`plan`: for each of the next `block` steps, the pool slot [S] of
    each segment's next slot, their blocks taken already), so a decoding step is three copies.
    """

    uniform = False

    def __init__(self):
        super().__init__()
        self.block = 16
        self.batch = self.heads = 0
        self.route = self.plan = None
        self.planned = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a PagedLayer is made by eviction (UniformLayer.keep), never filled from empty")

    @classmethod
    def from_grid(cls, grid: Grid, kept: torch.Tensor, riders: dict[str, torch.Tensor], *, block: int | None = None,
                  dtype: torch.dtype | None = None, make_store=FloatStore) -> PagedLayer:
        """The slots `kept` [B, Hkv, W] of `grid`, in a pool of exactly as many blocks as they need (of `block`
        slots; default `block_size` of their mean length). Keys and values are held by `make_store(zeros)`, a
        `FloatStore` by default (in `dtype`, default the grid's), or packed codes (`obcache.layouts.mixed`)."""
        layer = cls()
        layer.dtype, layer.device, layer.is_initialized = grid.keys.dtype, grid.keys.device, True
        layer.batch, layer.heads = kept.shape[:2]
        lengths = kept.sum(-1).flatten()  # [S]
        layer.block = block or block_size(float(lengths.float().mean()))
        blocks = -(-lengths // layer.block)  # [S]
        layer.table = _table(blocks)
        layer.owner = torch.arange(len(blocks), device=lengths.device).repeat_interleave(blocks)
        layer.lengths = lengths
        layer.free = lengths.new_empty(0)
        total, block = int(blocks.sum()), layer.block
        layer.keys = make_store(grid.keys.new_zeros(total, block, grid.keys.shape[-1]).to(dtype or grid.keys.dtype))
        layer.values = make_store(grid.values.new_zeros(total, block, grid.values.shape[-1]).to(dtype or grid.values.dtype))
        layer.dtype = grid.keys.dtype  # what reads give back
        layer.positions = torch.full((total, block), -1, dtype=torch.int32, device=layer.device)
        layer.riders = {name: rider.new_zeros(total, block) for name, rider in riders.items()}
        flat = layer._slots(lengths)  # pool slots of each segment's first `length` slots, in order
        layer._write(flat, grid.keys[kept], grid.values[kept], grid.positions[kept],
                     {name: rider[kept] for name, rider in riders.items()})
        layer.padded = bool((grid.positions[kept] < 0).any())
        layer._plan()
        return layer

    # -- geometry --

    def _slots(self, lengths: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """Flat pool slots (block x block size + offset) of slots start..start+length-1 of every segment,
        concatenated in segment order."""
        device = lengths.device
        segment = torch.arange(len(lengths), device=device).repeat_interleave(lengths)
        first = torch.cumsum(lengths, 0) - lengths
        slot = torch.arange(int(lengths.sum()), device=device) - first[segment]
        if start is not None:
            slot = slot + start[segment]
        return self.table[segment, slot // self.block] * self.block + slot % self.block

    def _write(self, flat: torch.Tensor, keys, values, positions, riders: dict[str, torch.Tensor]) -> None:
        self.keys.write(flat, keys)
        self.values.write(flat, values)
        self.positions.view(-1).index_copy_(0, flat, positions.to(torch.int32))
        for name, rider in self.riders.items():
            rider.view(-1).index_copy_(0, flat, riders[name].to(rider.dtype) if name in riders else
                                       rider.new_zeros(len(flat)))

    def _plan(self) -> None:
        """After the blocks changed hands: the decoding kernel's route; the next appends unplanned."""
        self.route = self.owner.clamp_min(0)
        self.plan, self.planned = None, 0

    def _plan_appends(self) -> None:
        """Take the blocks the next `block` slots of every segment need; `plan` their pool slots, step by step
        (one call of the fused CPU kernel where it applies)."""
        self._widen_table(-(-(int(self.lengths.max()) + self.block) // self.block))
        planned = kernels.plan(self.table, self.owner, self.route, self.free, self.lengths, self.block, self.block)
        if planned is not None and planned[1] < 0:  # too few free blocks: grow the pool
            self._grow(-planned[1])
            planned = kernels.plan(self.table, self.owner, self.route, self.free, self.lengths, self.block, self.block)
        if planned is not None:
            self.plan, left = planned
            self.free, self.planned = self.free[:left], 0
            return
        self._take_blocks(self.lengths + self.block)
        slot = self.lengths + torch.arange(self.block, device=self.device)[:, None]  # [block, S]: each step's slot
        self.plan = (self.table.gather(1, (slot // self.block).t()).t() * self.block + slot % self.block).contiguous()
        self.planned = 0

    def _take_blocks(self, lengths: torch.Tensor) -> None:
        """Give every segment the blocks it needs to hold `lengths` [S] slots."""
        have = (self.table >= 0).sum(1)
        need = -(-lengths // self.block)
        extra = (need - have).clamp_min(0)  # [S] new blocks per segment
        count = int(extra.sum())
        if not count:
            return
        self._widen_table(int(need.max()))
        ids = self._allocate(count)
        segment = torch.arange(len(extra), device=extra.device).repeat_interleave(extra)
        column = have[segment] + torch.arange(count, device=extra.device) - (torch.cumsum(extra, 0) - extra)[segment]
        self.table[segment, column] = ids
        self.owner[ids] = segment
        self.route = self.owner.clamp_min(0)

    def _widen_table(self, columns: int) -> None:
        """A block table of at least `columns` columns (the new ones -1)."""
        if columns > self.table.shape[1]:
            more = self.table.new_full((len(self.table), columns - self.table.shape[1]), -1)
            self.table = torch.cat([self.table, more], 1)

    def _copy_storage(self) -> None:
        for name in ("keys", "values", "positions", "owner", "table", "lengths", "free", "route"):
            setattr(self, name, getattr(self, name).clone())  # tensors, and the key and value stores
        if self.plan is not None:
            self.plan = self.plan.clone()
        self.riders = {name: rider.clone() for name, rider in self.riders.items()}

    def grid_index(self, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat pool slot [B, Hkv, W], valid [B, Hkv, W]) of the right-aligned grid (W: at least, and by
        default, the longest segment)."""
        width = self.get_seq_length() if width is None else width
        slot = self.lengths[:, None] - width + torch.arange(width, device=self.lengths.device)  # [S, W]
        valid = slot >= 0
        slot = slot.clamp_min(0)
        flat = self.table.gather(1, slot // self.block).clamp_min(0) * self.block + slot % self.block
        shape = (self.batch, self.heads, width)
        return flat.view(shape), valid.view(shape)

    def valid(self, width: int | None = None) -> torch.Tensor:
        """[B, Hkv, W] where the right-aligned grid holds a slot (nothing gathered)."""
        return right_aligned(self.lengths, self.batch, self.heads, self.get_seq_length() if width is None else width)

    def grid(self, width: int | None = None) -> Grid:
        flat, valid = self.grid_index(width)
        keys = self.keys.read(flat.reshape(-1)).view(*flat.shape, -1).to(self.dtype)
        values = self.values.read(flat.reshape(-1)).view(*flat.shape, -1).to(self.dtype)
        positions = self.positions.view(-1)[flat].masked_fill(~valid, -1)
        return Grid(keys, values, valid & (positions >= 0), positions)

    def rider(self, name: str) -> torch.Tensor | None:
        if name not in self.riders:
            return None
        flat, valid = self.grid_index()
        return self.riders[name].view(-1)[flat].masked_fill(~valid, 0)

    def set_rider(self, name: str, grid: torch.Tensor) -> None:
        self._own()
        if name not in self.riders:
            self.riders[name] = grid.new_zeros(self.positions.shape)
        flat, valid = self.grid_index()
        self.riders[name].view(-1).index_copy_(0, flat[valid], grid[valid])

    # -- writing --

    def _allocate(self, count: int) -> torch.Tensor:
        """Ids of `count` free blocks, growing the pool (by at least an eighth) when too few are free."""
        self._grow(count)
        taken, self.free = self.free[len(self.free) - count:], self.free[: len(self.free) - count]
        return taken

    def _grow(self, count: int) -> None:
        """At least `count` free blocks: the pool grows (by at least an eighth) when fewer are free."""
        if len(self.free) < count:
            grow = max(count - len(self.free), len(self.owner) // 8, 1)
            start = len(self.owner)
            extend = lambda x, fill: torch.cat([x, x.new_full((grow, *x.shape[1:]), fill)])  # noqa: E731
            self.keys.grow(grow)
            self.values.grow(grow)
            self.positions = extend(self.positions, -1)
            self.riders = {name: extend(rider, 0) for name, rider in self.riders.items()}
            self.owner = extend(self.owner, -1)
            self.route = self.owner.clamp_min(0)  # free blocks: segment 0, to which they add nothing
            self.free = torch.cat([self.free, torch.arange(start, start + grow, device=self.free.device)])

    def update(self, key_states, value_states, positions: torch.Tensor | None = None, *args, padded: bool | None = None,
               **kwargs):
        """Append q new slots [B, Hkv, q, d] to every segment, at `positions` [B, q], in place."""
        batch, heads, q = key_states.shape[:3]
        if (batch, heads) != (self.batch, self.heads):
            raise ValueError(f"new states have {batch} rows x {heads} heads, the layer {self.batch} x {self.heads}")
        if positions is None:
            start = int(self.positions.max()) + 1
            positions = torch.arange(start, start + q, dtype=torch.int32, device=self.device).expand(batch, -1)
        self._own()
        padded = bool((positions < 0).any()) if padded is None else padded
        if q == 1:  # a decoding step: planned slots
            if self.plan is None or self.planned == self.block:
                self._plan_appends()
            flat = self.plan[self.planned]
            self.planned += 1
            if not padded and not self.riders:  # three copies (one fused call where the CPU kernel applies)
                positions = positions.to(torch.int32)
                if not (isinstance(self.keys, FloatStore) and isinstance(self.values, FloatStore) and kernels.append(
                        self.keys.data, self.values.data, self.positions, self.lengths, flat, key_states,
                        value_states, positions)):
                    self.keys.write(flat, key_states)
                    self.values.write(flat, value_states)
                    self.positions.view(-1).index_copy_(0, flat, positions.expand(-1, heads).reshape(-1))
                    self.lengths += 1
                return key_states, value_states  # not read: obcache's attention reads the pool
        else:
            self._take_blocks(self.lengths + q)
            flat = self._slots(torch.full_like(self.lengths, q), start=self.lengths)
            self.plan = None
        new = positions.to(torch.int32).repeat_interleave(heads, 0).reshape(-1)
        self._write(flat, key_states.reshape(-1, key_states.shape[-1]), value_states.reshape(-1, value_states.shape[-1]),
                    new, {})
        self.lengths += q
        self.padded = self.padded or padded
        return key_states, value_states  # not read: obcache's attention reads the pool

    def keep(self, mask: torch.Tensor, room: int = 0) -> PagedLayer:
        """Keep the slots of `mask` [B, Hkv, W] (the grid of `grid()`): each segment's kept slots move, in order,
        into its first blocks; the blocks it no longer needs return to the pool (`room` is not needed: appends
        take blocks as they go)."""
        self._own()
        flat, valid = self.grid_index(mask.shape[-1])
        kept = mask & valid
        source = flat[kept]
        lengths = kept.sum(-1).flatten()
        moved = (self.keys.read(source), self.values.read(source),
                 self.positions.view(-1)[source], {name: rider.view(-1)[source] for name, rider in self.riders.items()})
        need = -(-lengths // self.block)
        have = -(-self.lengths // self.block)
        columns = torch.arange(self.table.shape[1], device=need.device)
        freed = (columns >= need[:, None]) & (columns < have[:, None])
        released = self.table[freed]
        self.owner[released] = -1
        self.positions[released] = -1
        self.table = self.table.masked_fill(columns >= need[:, None], -1)
        self.free = torch.cat([self.free, released])
        last = self.table.gather(1, (need - 1).clamp_min(0)[:, None]).squeeze(1)
        self.positions[last[need > 0]] = -1  # the last blocks are refilled from their start
        self.lengths = lengths
        self._write(self._slots(lengths), *moved)
        self.padded = self.padded and bool((moved[2] < 0).any())
        if 4 * len(self.free) > len(self.owner):
            self._trim()
        self._plan()
        return self

    def _trim(self) -> None:
        """Return the free blocks' memory when they are more than a quarter of the pool (an eviction that dropped
        much of what the pool held, e.g. the prompt's under a smaller decode capacity; a decoding interval frees
        far less): the owned blocks move, in order, to a pool of just them."""
        owned = (self.owner >= 0).nonzero().squeeze(1)
        new_id = torch.full_like(self.owner, -1)
        new_id[owned] = torch.arange(len(owned), device=owned.device)
        self.keys.take(owned)
        self.values.take(owned)
        self.positions, self.owner = self.positions[owned], self.owner[owned]  # route: `_plan` next
        self.riders = {name: rider[owned] for name, rider in self.riders.items()}
        self.table = torch.where(self.table >= 0, new_id[self.table.clamp_min(0)], -1)
        self.free = self.free[:0]

    # -- reading --

    def block_sets(self, dtype: torch.dtype) -> list[Blocks]:
        """The pool as the decoding kernel reads it (one set: the whole pool)."""
        return [Blocks(self.keys.blocks(dtype), self.values.blocks(dtype), self.positions, self.route)]

    def get_seq_length(self) -> int:
        return int(self.lengths.max()) if len(self.lengths) else 0

    def head_lengths(self) -> torch.Tensor:
        if not self.padded:
            return self.lengths.view(self.batch, self.heads)
        real = (self.positions >= 0).sum(-1)  # [N] real slots per block
        counts = torch.zeros_like(self.lengths).index_add_(0, self.owner.clamp_min(0), real * (self.owner >= 0))
        return counts.view(self.batch, self.heads)

    def nbytes(self) -> int:
        """Bytes of the key and value pool held (free blocks and unfilled slots included)."""
        return self.keys.nbytes() + self.values.nbytes()

    def index_nbytes(self) -> int:
        return sum(t.nbytes for t in (self.positions, self.owner, self.table, self.lengths, self.free,
                                      self.route, *self.riders.values()))


def _table(blocks: torch.Tensor) -> torch.Tensor:
    """[S, max blocks] block table of segments owning `blocks` [S] consecutive blocks of a fresh pool."""
    width = max(1, int(blocks.max())) if len(blocks) else 1
    first = torch.cumsum(blocks, 0) - blocks
    columns = torch.arange(width, device=blocks.device)
    return torch.where(columns < blocks[:, None], first[:, None] + columns, -1)
