"""The paged layout, against independent computations: attention per segment in float64, positions and riders
tracked by hand, bytes counted from the kept lengths."""

from __future__ import annotations

import pytest
import torch

from obcache import kernels
from obcache.attention import decode_blocks, paged_attention
from obcache.layouts import Blocks, Grid, PagedLayer, UniformLayer, block_size

B, HKV, G, D = 2, 3, 2, 8


def uniform_layer(length: int, seed: int = 0, dtype=torch.float32) -> UniformLayer:
    generator = torch.Generator().manual_seed(seed)
    layer = UniformLayer()
    layer.update(torch.randn(B, HKV, length, D, generator=generator).to(dtype),
                 torch.randn(B, HKV, length, D, generator=generator).to(dtype))
    return layer


def random_kept(length: int, seed: int = 1) -> torch.Tensor:
    """A keep mask [B, Hkv, length] with a different number of slots per head (at least one each)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, HKV, length, generator=generator) < torch.rand(B, HKV, 1, generator=generator)
    mask[..., -1] = True
    return mask


def reference(query: torch.Tensor, layer, query_positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(s q k^T) v per (row, KV head) over the slots it holds at or before each query, in float64, from the
    layer's own grid (positions and validity), one segment at a time."""
    grid = layer.grid()
    out = torch.zeros(*query.shape[:3], grid.values.shape[-1], dtype=torch.float64)
    for row in range(query.shape[0]):
        for head in range(HKV):
            keep = grid.valid[row, head]
            keys, values = grid.keys[row, head][keep].double(), grid.values[row, head][keep].double()
            slots = grid.positions[row, head][keep]
            for g in range(G):
                q = query[row, head * G + g].double()  # [q, d]
                logits = scaling * q @ keys.T
                logits = logits.masked_fill(slots[None, :] > query_positions[:, None], float("-inf"))
                out[row, head * G + g] = logits.softmax(-1) @ values
    return out.transpose(1, 2)


@pytest.mark.parametrize("block", [1, 3, 4, 16])
def test_a_decoding_step_over_the_pool_equals_softmax_per_segment(block):
    layer = uniform_layer(40)
    paged = PagedLayer.from_grid(layer.grid(), random_kept(40), {}, block=block)
    paged.update(torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D), torch.full((B, 1), 40, dtype=torch.int32))
    query = torch.randn(B, HKV * G, 1, D)
    torch.testing.assert_close(decode_blocks(query, paged.block_sets(query.dtype), HKV, 0.3).double(),
                               reference(query, paged, torch.tensor([40]), 0.3),
                               rtol=1e-5, atol=1e-6)


def test_several_new_tokens_see_their_slots_causally():
    paged = PagedLayer.from_grid(uniform_layer(30).grid(), random_kept(30, seed=4), {}, block=4)
    new = torch.arange(30, 35, dtype=torch.int32).expand(B, -1)
    paged.update(torch.randn(B, HKV, 5, D), torch.randn(B, HKV, 5, D), new)
    query = torch.randn(B, HKV * G, 5, D)
    positions = torch.arange(30, 35)
    torch.testing.assert_close(paged_attention(query, paged, positions, 0.25).double(),
                               reference(query, paged, positions, 0.25), rtol=1e-5, atol=1e-6)


def test_appends_are_written_in_place_and_freed_blocks_are_reused():
    layer = uniform_layer(48)
    kept = random_kept(48, seed=2)
    paged = PagedLayer.from_grid(layer.grid(), kept, {"running": torch.rand(B, HKV, 48)}, block=4)
    expected = [[list(map(int, torch.nonzero(kept[row, head]).flatten())) for head in range(HKV)] for row in range(B)]
    for step in range(48, 200):
        paged.update(torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D), torch.full((B, 1), step, dtype=torch.int32))
        for row in expected:
            for head in row:
                head.append(step)
        if step % 8 == 0:  # evict back to (about) 20 slots per head: drop each head's oldest slots
            grid = paged.grid()
            keep = grid.valid & (torch.cumsum(grid.valid.flip(-1), -1).flip(-1) <= 20)
            paged.keep(keep)
            for row in expected:
                for index, head in enumerate(row):
                    row[index] = head[-20:]
        assert [[p.tolist() for p in row] for row in paged.kept_positions()] == expected
    pool, blocks = paged.keys, len(paged.owner)
    for step in range(200, 400):  # past the first evictions the pool never grows: freed blocks are reused
        paged.update(torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D), torch.full((B, 1), step, dtype=torch.int32))
        if step % 8 == 0:
            grid = paged.grid()
            paged.keep(grid.valid & (torch.cumsum(grid.valid.flip(-1), -1).flip(-1) <= 20))
    assert paged.keys is pool and len(paged.owner) == blocks  # the same storage, written in place


@pytest.mark.parametrize("fused", [True, False])
def test_decoding_appends_write_each_row_at_its_own_position(fused, monkeypatch):
    """Decoding steps (the fused append kernel where it builds, else the torch writes) put each segment's new key
    and value after its kept slots, at its row's position, across plans of `block` steps."""
    if fused and not kernels.available():
        pytest.skip("no C compiler for the fused CPU kernel")
    if not fused:
        monkeypatch.setenv("OBCACHE_CPU_KERNEL", "0")
    layer, kept = uniform_layer(30), random_kept(30, seed=5)
    paged = PagedLayer.from_grid(layer.grid(), kept, {}, block=4)
    start = layer.grid()
    expected = {name: [[getattr(start, name)[row, head][kept[row, head]] for head in range(HKV)] for row in range(B)]
                for name in ("keys", "values", "positions")}
    generator = torch.Generator().manual_seed(6)
    for step in range(11):  # three plans of 4 steps: new blocks taken twice
        keys, values = torch.randn(2, B, HKV, 1, D, generator=generator)
        positions = torch.tensor([[30 + step], [70 + step]], dtype=torch.int32)  # each row its own position
        paged.update(keys, values, positions)
        for row in range(B):
            for head in range(HKV):
                for name, new in (("keys", keys[row, head]), ("values", values[row, head]),
                                  ("positions", positions[row])):
                    expected[name][row][head] = torch.cat([expected[name][row][head], new])
    grid = paged.grid()
    for row in range(B):
        for head in range(HKV):
            held = grid.valid[row, head]
            for name in ("keys", "values", "positions"):
                assert torch.equal(getattr(grid, name)[row, head][held], expected[name][row][head]), name
    assert paged.lengths.tolist() == (kept.sum(-1).flatten() + 11).tolist()


def test_riders_follow_the_slots_and_start_at_zero():
    layer = uniform_layer(20)
    running = torch.arange(B * HKV * 20, dtype=torch.float32).view(B, HKV, 20)
    layer.set_rider("running", running)
    kept = random_kept(20, seed=3)
    paged = layer.keep(kept)
    assert not paged.uniform
    grid = paged.rider("running")
    for row in range(B):
        for head in range(HKV):
            held = grid[row, head][paged.grid().valid[row, head]]
            assert held.tolist() == running[row, head][kept[row, head]].tolist()
    paged.update(torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D), torch.full((B, 1), 20, dtype=torch.int32))
    assert (paged.rider("running")[..., -1] == 0).all()


def test_a_fork_writes_without_changing_the_original():
    paged = PagedLayer.from_grid(uniform_layer(24).grid(), random_kept(24), {}, block=4)
    before = [[p.clone() for p in row] for row in paged.kept_positions()]
    twin = paged.fork()
    twin.update(torch.randn(B, HKV, 3, D), torch.randn(B, HKV, 3, D), torch.arange(24, 27, dtype=torch.int32).expand(B, -1))
    twin.keep(twin.grid().valid & (torch.rand(B, HKV, twin.get_seq_length()) < 0.5))
    assert all(torch.equal(a, b) for row, again in zip(before, paged.kept_positions()) for a, b in zip(row, again))
    uniform = uniform_layer(10)
    copy = uniform.fork()
    copy.update(torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D))
    assert uniform.get_seq_length() == 10 and copy.get_seq_length() == 11


@pytest.mark.parametrize("mean", [236, 441, 852, 745])  # SmolLM2's AdaKV means at 2k/4k/8k, an 8B shape's
def test_the_bytes_held_after_eviction_stay_within_3_percent_of_the_kept_tokens(mean):
    """Real AdaKV spreads (max/mean ~2): the pool holds the kept slots plus each head's partly filled last block."""
    generator = torch.Generator().manual_seed(mean)
    lengths = (torch.rand(64, generator=generator) * 1.5 + 0.25) * mean  # 0.25x to 1.75x the mean
    lengths = lengths.round().long().clamp_min(1)
    width = int(lengths.max())
    kept = (torch.arange(width) >= width - lengths[:, None]).view(8, 8, width)
    keys = torch.zeros(8, 8, width, 4)
    paged = PagedLayer.from_grid(Grid(keys, keys, kept, torch.zeros(8, 8, width, dtype=torch.int32)), kept, {})
    slot_bytes = 2 * 4 * 4  # K and V, 4 dims, float32
    assert paged.block == block_size(float(lengths.float().mean()))
    assert paged.nbytes() <= 1.03 * int(lengths.sum()) * slot_bytes


def test_an_eviction_that_frees_most_of_the_pool_returns_the_memory():
    """Keeping a tenth of the slots leaves more than half the pool free: the pool shrinks to the blocks the heads
    need (bytes counted from the kept lengths by hand), and a decoding step still equals softmax per segment."""
    layer = uniform_layer(80)
    paged = PagedLayer.from_grid(layer.grid(), random_kept(80, seed=4) | True, {}, block=4)  # every slot kept
    full_blocks = len(paged.owner)
    generator = torch.Generator().manual_seed(6)
    mask = paged.valid() & (torch.rand(B, HKV, paged.get_seq_length(), generator=generator) < 0.1)
    mask[..., -1] = True
    paged.keep(mask)
    need = int((-(-paged.lengths // 4)).sum())
    assert len(paged.owner) == need < full_blocks // 4 and len(paged.free) == 0
    assert paged.nbytes() == need * 4 * D * 2 * 4  # blocks x slots x dims x (key, value) x float32
    paged.update(torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D), torch.full((B, 1), 80, dtype=torch.int32))
    query = torch.randn(B, HKV * G, 1, D)
    torch.testing.assert_close(decode_blocks(query, paged.block_sets(query.dtype), HKV, 0.3).double(),
                               reference(query, paged, torch.tensor([80]), 0.3), rtol=1e-5, atol=1e-6)


def pool_reference(query, blocks, heads: int, scaling: float) -> torch.Tensor:
    """softmax(s q k^T) v of each segment over its blocks' slots with a position >= 0, in float64, one segment at a
    time; query [B, Hq, 1, d] -> [B, 1, Hq, dv]."""
    batch, query_heads, _, dim = query.shape
    group = query_heads // heads
    out = torch.zeros(batch * heads, group, blocks.values.shape[-1], dtype=torch.float64)
    for segment in range(batch * heads):
        mine = blocks.route == segment
        real = blocks.positions[mine].reshape(-1) >= 0
        keys = blocks.keys[mine].reshape(-1, dim)[real].double()
        values = blocks.values[mine].reshape(-1, blocks.values.shape[-1])[real].double()
        q = query.reshape(batch * heads, group, dim)[segment].double()
        out[segment] = (scaling * q @ keys.T).softmax(-1) @ values
    return out.view(batch, 1, query_heads, -1)


@pytest.mark.skipif(not kernels.available(), reason="no C compiler for the fused CPU kernel")
@pytest.mark.parametrize("group, dim, block", [(1, 8, 1), (3, 64, 8), (7, 64, 16), (5, 24, 3), (8, 128, 32)])
def test_the_fused_cpu_kernel_equals_softmax_per_segment(group, dim, block):
    """Blocks in any order, free ones (every position -1), padding slots, and logits of very different scales per
    segment (the running max must rescale: a segment's first blocks far below its later ones)."""
    generator = torch.Generator().manual_seed(group * dim + block)
    heads, batch, count = 3, 2, 40
    route = torch.randint(0, batch * heads, (count,), generator=generator)
    route[: batch * heads] = torch.arange(batch * heads)  # every segment has a block
    positions = torch.randint(0, 1000, (count, block), generator=generator, dtype=torch.int32)
    positions[torch.rand(count, block, generator=generator) < 0.2] = -1
    positions[: batch * heads, 0] = 5  # at least one real slot each
    positions[-3:] = -1  # free blocks
    keys = torch.randn(count, block, dim, generator=generator)
    keys *= torch.linspace(0.1, 30.0, count)[:, None, None]  # logits from ~1 to ~500 nats apart
    values = torch.randn(count, block, dim, generator=generator)
    query = torch.randn(batch, heads * group, 1, dim, generator=generator)
    blocks = Blocks(keys, values, positions, route)
    fused = kernels.paged_decode(query, [blocks], heads, 0.3)
    expected = pool_reference(query, blocks, heads, 0.3)
    # float32 logits of ~500 nats carry ~1e-4 of rounding: both kernels are held to it
    torch.testing.assert_close(fused.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decode_blocks(query, [blocks], heads, 0.3).double(), expected, rtol=1e-4, atol=1e-4)
    halves = [Blocks(keys[part], values[part], positions[part], route[part]) for part in (slice(0, 17), slice(17, None))]
    torch.testing.assert_close(kernels.paged_decode(query, halves, heads, 0.3).double(), expected,  # sets accumulate
                               rtol=1e-4, atol=1e-4)


def test_the_fused_kernel_applies_to_float32_on_the_cpu_only(monkeypatch):
    blocks = Blocks(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.zeros(4, 2, dtype=torch.int32), torch.arange(4))
    query = torch.randn(1, 4, 1, 8)
    assert kernels.paged_decode(query.double(), [blocks], 4, 1.0) is None
    monkeypatch.setenv("OBCACHE_CPU_KERNEL", "0")
    assert kernels.paged_decode(query, [blocks], 4, 1.0) is None


def test_without_a_compiler_the_kernel_warns_and_the_torch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler-obcache")
    monkeypatch.setenv("OBCACHE_KERNEL_DIR", str(tmp_path))
    kernels._library.cache_clear()
    try:
        blocks = Blocks(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.zeros(4, 2, dtype=torch.int32),
                        torch.arange(4))
        with pytest.warns(UserWarning, match="no C compiler"):
            assert kernels.paged_decode(torch.randn(1, 4, 1, 8), [blocks], 4, 1.0) is None
        layer = uniform_layer(40)
        paged = PagedLayer.from_grid(layer.grid(), random_kept(40), {}, block=4)
        paged.update(torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D), torch.full((B, 1), 40, dtype=torch.int32))
        query = torch.randn(B, HKV * G, 1, D)
        torch.testing.assert_close(paged_attention(query, paged, torch.tensor([40]), 0.3).double(),
                                   reference(query, paged, torch.tensor([40]), 0.3), rtol=1e-5, atol=1e-6)
    finally:
        kernels._library.cache_clear()  # the next caller builds (or finds) the real one
