"""The mixed-precision layout: each kept token stored at its own width, in blocks that hold one width each.

A `MixedLayer` is a set of paged parts (`layouts.PagedLayer`), one per width:
16-bit floats (`FloatStore` in float16, or the model's dtype when it is
16-bit), and 8, 4 or 2 bits (`PackedStore`: codes packed `8 / bits` per byte,
a float16 scale and zero per group of `group_size` channels of a token,
`obcache.quantization`). A token is in exactly one part; new tokens enter the
16-bit part (a residual window in full precision), and every eviction
re-allocates the widths (`Widths`, from `obcache.policies.mixed`). The
decoding kernel reads every part's blocks, dequantized on the fly, in one
batched computation (`attention.decode_blocks`: one set per part);
`grid()` gives the parts' slots as one right-aligned grid sorted by position.
`nbytes()` counts the keys and values held: codes, scales, zeros and 16-bit parts; `index_nbytes()` the
parts' slot index (the cache's `nbytes()` sums both).
"""

from __future__ import annotations

from functools import partial

import torch

from obcache.layouts.base import Grid, Layer, right_aligned
from obcache.layouts.paged import Blocks, FloatStore, PagedLayer
from obcache.quantization import SCALE_DTYPE, QuantizedTensor, quantize
from obcache.selector import Widths


class PackedStore:
    """Keys (or values) of a block pool packed at `bits`, per slot in groups of `group_size` along the head dim:
    codes [N * block, d * bits / 8] uint8, scales and zeros [N * block, d / group_size] float16; read back as `dtype`."""

    def __init__(self, data: torch.Tensor, *, bits: int, group_size: int):
        slots, self.dim = data.shape[0] * data.shape[1], data.shape[-1]
        self.block, self.bits, self.group_size, self.dtype = data.shape[1], bits, group_size, data.dtype
        self.codes = torch.zeros(slots, self.dim * bits // 8, dtype=torch.uint8, device=data.device)
        self.scales = torch.zeros(slots, self.dim // group_size, dtype=SCALE_DTYPE, device=data.device)
        self.zeros = torch.zeros_like(self.scales)

    def read(self, flat: torch.Tensor) -> torch.Tensor:
        stored = QuantizedTensor(self.codes[flat], self.scales[flat], self.zeros[flat], self.bits, self.group_size, 1,
                                 torch.Size((len(flat), self.dim)), self.dtype)
        return stored.dequantize()

    def write(self, flat: torch.Tensor, rows: torch.Tensor) -> None:
        if not len(flat):
            return
        packed = quantize(rows.reshape(len(flat), self.dim).to(self.dtype), self.bits, self.group_size)
        self.codes.index_copy_(0, flat, packed.codes)
        self.scales.index_copy_(0, flat, packed.scales)
        self.zeros.index_copy_(0, flat, packed.zeros)

    def blocks(self, dtype: torch.dtype) -> torch.Tensor:
        every = torch.arange(len(self.codes), device=self.codes.device)
        return self.read(every).view(-1, self.block, self.dim).to(dtype)

    def grow(self, count: int) -> None:
        extra = count * self.block
        self.codes = torch.cat([self.codes, self.codes.new_zeros(extra, self.codes.shape[1])])
        self.scales = torch.cat([self.scales, self.scales.new_zeros(extra, self.scales.shape[1])])
        self.zeros = torch.cat([self.zeros, self.zeros.new_zeros(extra, self.zeros.shape[1])])

    def take(self, blocks: torch.Tensor) -> None:
        """Keep only `blocks` [n] (block ids), in that order: the pool shrinks to n blocks."""
        rows = (blocks[:, None] * self.block + torch.arange(self.block, device=blocks.device)).flatten()
        self.codes, self.scales, self.zeros = self.codes[rows], self.scales[rows], self.zeros[rows]

    def clone(self) -> PackedStore:
        twin = object.__new__(PackedStore)
        twin.__dict__.update(self.__dict__)
        twin.codes, twin.scales, twin.zeros = self.codes.clone(), self.scales.clone(), self.zeros.clone()
        return twin

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


#: Slots per block of a packed part. Packed parts never grow (new tokens enter the 16-bit part) and their
#: per-segment counts are what the allocator chose, so small blocks keep the last, partly filled block of each
#: (segment, width) from adding bytes the byte budget did not price (16-slot blocks: +1.2% at 5% of the bytes).
PACKED_BLOCK = 4


def storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """How 16-bit tokens are held for a model computing in `dtype`: as it is when 16-bit, else float16."""
    return dtype if dtype.itemsize == 2 else torch.float16


class MixedLayer(Layer):
    """A layer whose kept tokens are stored at different widths (module docstring); `parts` width -> PagedLayer."""

    uniform = False

    def __init__(self):
        super().__init__()
        self.parts: dict[int, PagedLayer] = {}
        self.group_size = 32
        self.batch = self.heads = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("a MixedLayer is made by eviction, never filled from empty")

    @classmethod
    def from_grid(cls, grid: Grid, widths: Widths, riders: dict[str, torch.Tensor]) -> MixedLayer:
        """The slots of `grid` at their `widths` (0: dropped), one part per width (16 always, for new tokens)."""
        layer = cls()
        layer.dtype, layer.device, layer.is_initialized = grid.keys.dtype, grid.keys.device, True
        layer.batch, layer.heads = widths.bits.shape[:2]
        layer.group_size = widths.group_size
        bits = widths.bits.masked_fill(~grid.valid, 0)
        for width in sorted({16, *bits.unique().tolist()} - {0}, reverse=True):
            store = FloatStore if width == 16 else partial(PackedStore, bits=width, group_size=widths.group_size)
            layer.parts[width] = PagedLayer.from_grid(grid, bits == width, riders, make_store=store,
                                                      block=None if width == 16 else PACKED_BLOCK,
                                                      dtype=storage_dtype(grid.keys.dtype) if width == 16 else None)
        return layer

    # -- one grid over the parts --

    def _merged(self, width: int | None = None) -> tuple[list[Grid], torch.Tensor, torch.Tensor]:
        """(each part's grid, the concatenation order sorting every segment's slots by position, invalid ones
        first [B, Hkv, W], the parts' widths per concatenated column [W_all])."""
        grids = [part.grid() for part in self.parts.values()]
        positions = torch.cat([g.positions.masked_fill(~g.valid, -1) for g in grids], dim=-1)
        order = torch.sort(positions, dim=-1, stable=True).indices
        total = int(torch.stack([part.lengths for part in self.parts.values()]).sum(0).max())
        width = total if width is None else width
        order = order[..., max(0, order.shape[-1] - width):]
        columns = torch.cat([torch.full((g.valid.shape[-1],), w, device=self.device)
                             for w, g in zip(self.parts, grids)])
        return grids, order, columns

    def grid(self, width: int | None = None) -> Grid:
        grids, order, _ = self._merged(width)
        pick = lambda x: torch.cat(x, dim=2).gather(2, order.view(*order.shape, *[1] * (x[0].dim() - 3)).expand(  # noqa: E731
            *order.shape, *x[0].shape[3:]))
        merged = Grid(pick([g.keys for g in grids]), pick([g.values for g in grids]), pick([g.valid for g in grids]),
                      pick([g.positions for g in grids]))
        pad = 0 if width is None else width - order.shape[-1]
        if pad <= 0:
            return merged
        left = lambda x, fill: torch.cat([x.new_full((*x.shape[:2], pad, *x.shape[3:]), fill), x], 2)  # noqa: E731
        return Grid(left(merged.keys, 0), left(merged.values, 0), left(merged.valid, False),
                    left(merged.positions, -1))

    def valid(self, width: int | None = None) -> torch.Tensor:
        """[B, Hkv, W] where the right-aligned grid holds a slot (nothing gathered)."""
        lengths = torch.stack([part.lengths for part in self.parts.values()]).sum(0)  # [S]
        return right_aligned(lengths, self.batch, self.heads, width)

    def bits(self, width: int | None = None) -> torch.Tensor:
        """[B, Hkv, W]: the width each slot of `grid(width)` is stored at (0 where invalid)."""
        grids, order, columns = self._merged(width)
        valid = torch.cat([g.valid for g in grids], dim=2)
        bits = columns.expand_as(valid).masked_fill(~valid, 0).gather(2, order)
        pad = 0 if width is None else width - order.shape[-1]
        return torch.cat([bits.new_zeros(*bits.shape[:2], pad), bits], 2) if pad > 0 else bits

    def rider(self, name: str) -> torch.Tensor | None:
        if not any(name in part.riders for part in self.parts.values()):
            return None
        grids, order, _ = self._merged()
        ridden = [part.rider(name) if name in part.riders else torch.zeros(g.valid.shape, device=self.device)
                  for part, g in zip(self.parts.values(), grids)]
        return torch.cat(ridden, dim=2).gather(2, order)

    def set_rider(self, name: str, grid: torch.Tensor) -> None:
        grids, order, _ = self._merged(grid.shape[-1])
        spread = grid.new_zeros(*order.shape[:2], sum(g.valid.shape[-1] for g in grids)).scatter_(2, order, grid)
        for part, piece in zip(self.parts.values(), spread.split([g.valid.shape[-1] for g in grids], dim=2)):
            part.set_rider(name, piece)

    def rider_names(self) -> list[str]:
        return sorted({name for part in self.parts.values() for name in part.riders})

    # -- writing --

    def update(self, key_states, value_states, positions: torch.Tensor | None = None, *args, padded: bool | None = None,
               **kwargs):
        """New tokens enter the 16-bit part."""
        return self.parts[16].update(key_states, value_states, positions, padded=padded)

    def keep(self, choice: torch.Tensor | Widths, room: int = 0) -> MixedLayer:
        """The layer holding the slots of a keep mask [B, Hkv, W] (each at its width), or re-stored at `Widths`
        (`room` is not needed: its 16-bit part takes blocks as appends go)."""
        grid = self.grid(choice.bits.shape[-1] if isinstance(choice, Widths) else choice.shape[-1])
        if not isinstance(choice, Widths):
            choice = Widths(self.bits(choice.shape[-1]).masked_fill(~choice, 0), self.group_size)
        layer = MixedLayer.from_grid(grid, choice, {name: self.rider(name) for name in self.rider_names()})
        layer.policy_state = self.policy_state
        return layer

    def fork(self) -> MixedLayer:
        twin = super().fork()
        twin.parts = {width: part.fork() for width, part in self.parts.items()}
        return twin

    def _copy_storage(self) -> None:  # the parts copy their own storage when written
        pass

    # -- reading --

    def block_sets(self, dtype: torch.dtype) -> list[Blocks]:
        """Every part's blocks, dequantized to `dtype`: one set per width."""
        return [blocks for part in self.parts.values() for blocks in part.block_sets(dtype)]

    def head_lengths(self) -> torch.Tensor:
        return torch.stack([part.head_lengths() for part in self.parts.values()]).sum(0)

    def get_seq_length(self) -> int:
        return int(self.head_lengths().max())

    def nbytes(self) -> int:
        """Every byte of stored keys and values: packed codes, their scales and zeros, and the 16-bit parts."""
        return sum(part.nbytes() for part in self.parts.values())

    def index_nbytes(self) -> int:
        return sum(part.index_nbytes() for part in self.parts.values())
