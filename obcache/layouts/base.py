"""What every cache layer layout shares: the grid view, copy on write, riders, the policy's state."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from transformers.cache_utils import CacheLayerMixin


class Grid(NamedTuple):
    """A layer's slots as a [B, Hkv, W] grid, segments right-aligned: keys [B, Hkv, W, d], values, and the
    validity mask and positions (int32, -1 where invalid) [B, Hkv, W]."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor


def right_aligned(lengths: torch.Tensor, batch: int, heads: int, width: int | None = None) -> torch.Tensor:
    """[B, Hkv, W] bool: where a right-aligned grid of segments holding `lengths` [S] slots (s = row x Hkv + head)
    has a slot; W: `width`, default the longest segment."""
    width = int(lengths.max()) if width is None else width
    columns = torch.arange(width, device=lengths.device)
    return (columns >= width - lengths[:, None]).view(batch, heads, width)


class Layer(CacheLayerMixin):
    """What both layouts share: copy on write, riders in grid coordinates, the policy's state."""

    is_sliding = False
    uniform = True  # every KV head holds as many slots (the model's own attention kernel reads it)

    def __init__(self):  # not CacheLayerMixin's: its keys/values are this class's own (views of the storage)
        self.is_initialized = False
        self.riders: dict[str, torch.Tensor] = {}
        self.policy_state: object | None = None
        self.padded = False  # whether any slot holds a padding position
        self._shared = False  # the storage is shared with a fork: copy before writing

    def fork(self) -> Layer:
        """A layer that shares this one's slots now; whichever writes first copies them."""
        twin = copy.copy(self)
        twin.riders = dict(self.riders)
        self._shared = twin._shared = True
        return twin

    def _own(self) -> None:
        if self._shared:
            self._copy_storage()
            self._shared = False

    def _copy_storage(self) -> None:
        raise NotImplementedError

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("obcache caches do not support beam search; use greedy or sampling")

    def rider(self, name: str) -> torch.Tensor | None:
        """A rider in grid coordinates [B, Hkv, W] (0 for invalid slots), or None if the layer has none."""
        raise NotImplementedError

    def rider_names(self) -> list[str]:
        return list(self.riders)

    def set_rider(self, name: str, grid: torch.Tensor) -> None:
        """Write a rider's values, given in grid coordinates [B, Hkv, W], into the layer's slots."""
        raise NotImplementedError

    def kept_positions(self) -> list[list[torch.Tensor]]:
        """Per batch row and KV head, the sorted positions of its real slots."""
        grid = self.grid()
        return [[head[head >= 0] for head in row] for row in grid.positions.masked_fill(~grid.valid, -1)]
