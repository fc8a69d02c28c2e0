"""Selection under tensor parallelism: two CPU processes (gloo), each holding some of a layer's KV heads,
choose exactly what one process holding every head chooses (its part of the single-device mask)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from obcache import AdaKV, GlobalKV, SnapKV
from obcache.layer_state import LayerState
from obcache.selection import adaptive_mask, combine_heads

HEADS_PER_RANK = (2, 3)  # per-rank head counts need not be equal
B, L = 2, 23


def _scores(seed: int, heads: int, ties: bool) -> torch.Tensor:
    """[B, heads, L] scores, with many exact ties if asked, some protected (+inf) and padded (-inf) tokens."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (B, heads, L), generator=generator).float() if ties else torch.rand(
        B, heads, L, generator=generator)
    scores[:, :, -2:] = float("inf")  # a protected window
    scores[1, :, :3] = float("-inf")  # left padding of row 1
    return scores


def _mine(tensor: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
    start = sum(HEADS_PER_RANK[:rank])
    return tensor.narrow(dim, start, HEADS_PER_RANK[rank])


def _layer(keys: torch.Tensor, layer_idx: int) -> LayerState:
    return LayerState(keys=keys, values=keys, scaling=0.3, query_heads=keys.shape[1], key_mask=None, layer_idx=layer_idx,
                      num_layers=3, queries=lambda first, last: keys[:, :, first:last])


def _check(rank: int) -> None:
    group, heads = dist.group.WORLD, sum(HEADS_PER_RANK)
    for seed, (k, floor) in enumerate([(6, 2), (9, 1), (L, 0), (1, 1), (12, 12)]):  # (L, 0): more slots than rank 0 has tokens
        for ties in (True, False):
            scores = _scores(seed, heads, ties)
            expected = _mine(adaptive_mask(scores.clone(), k, floor), rank)
            assert torch.equal(adaptive_mask(_mine(scores, rank).clone(), k, floor, group), expected), (k, floor, ties)
    for combine in ("normalized-mean", "mean", "max"):
        scores = _scores(7, heads, ties=False).clamp(0, 1)
        torch.testing.assert_close(combine_heads(_mine(scores, rank), combine, group), combine_heads(scores, combine))
    # the policies: AdaKV per layer, GlobalKV over layers (its per-layer normalisation over every rank's heads)
    keys = torch.randn(B, heads, L, 4, generator=torch.Generator().manual_seed(3))
    layer_scores = [torch.rand(B, heads, L, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    for wrap in (lambda policy: AdaKV(policy, alpha=0.25), lambda policy: GlobalKV(policy, alpha=0.25)):
        alone, split = wrap(SnapKV(budget=0.3, window=2)), wrap(SnapKV(budget=0.3, window=2, group=group))
        layers = [_layer(keys, i) for i in range(3)]
        mine = [_layer(_mine(keys, rank), i) for i in range(3)]
        if isinstance(alone, GlobalKV):
            expected = alone.select_layers(layers, layer_scores)
            got = split.select_layers(mine, [_mine(s, rank) for s in layer_scores])
        else:
            expected = [alone.select(layer, s) for layer, s in zip(layers, layer_scores)]
            got = [split.select(layer, _mine(s, rank)) for layer, s in zip(mine, layer_scores)]
        for e, g in zip(expected, got):
            assert torch.equal(g, _mine(e, rank)), type(alone).__name__


def _worker(rank: int, world: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        _check(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_two_ranks_choose_what_one_device_chooses(tmp_path):
    mp.spawn(_worker, args=(len(HEADS_PER_RANK), str(tmp_path / "store")), nprocs=len(HEADS_PER_RANK), join=True)


def test_a_policy_carries_its_group_outside_its_identity():
    """The process group is not a hyper-parameter: equal policies with and without it score alike."""
    assert SnapKV(group=object()) == SnapKV() and "group" not in repr(SnapKV(group=object()))
    assert AdaKV(SnapKV(group="g")).group == "g"
