"""Selection under tensor parallelism: two CPU processes (gloo), each holding some of a layer's KV heads,
choose exactly what one process holding every head chooses (its part of the single-device mask)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import obcache

from obcache import H2O, TOVA, AdaKV, Decoding, GlobalKV, KVzip, KVzipHeads, SnapKV
from obcache.layer_state import LayerState
from obcache.selection import adaptive_mask, combine_heads
from tests.conftest import FAMILIES, tiny_model

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
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
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


# ---------------------------------------------------------------- a model split by transformers' tensor parallelism

NEW_TOKENS = 8


def _configs(group=None) -> dict:
    """Every selection that chooses across heads, with each score kind, plus per-head and decode-time eviction."""
    return {
        "adakv": lambda: AdaKV(SnapKV(budget=12, window=4, score="obc-joint", group=group)),
        "global": lambda: GlobalKV(SnapKV(budget=0.3, window=4, score="obc-key", group=group)),
        "shared spans": lambda: SnapKV(budget=12, window=4, selection="shared", chunk=4, score="obc-value", group=group),
        "per-head": lambda: TOVA(budget=12, score="exact-removal"),
        "decoding": lambda: Decoding(AdaKV(H2O(budget=16, sinks=2, window=4, score="obc-key", group=group), alpha=0.1),
                                     capacity=16, interval=2),
        "kvzip": lambda: GlobalKV(KVzip(score="attention", budget=0.3, group=group)),
        "kvzip heads": lambda: KVzipHeads(score="obc-key", budget=0.3, calibration=256, group=group),
    }


def _generate(model, tokenizer, make) -> dict:
    ids = torch.randint(10, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    policy = make()
    for _ in range(2):  # rates this rank's heads, then finds them rated
        obcache.calibrate(model, tokenizer, policy)
    with policy.attach(model, tokenizer=tokenizer):
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    cache = out.past_key_values
    return {"tokens": out.sequences, "kept": [cache.kept_positions(i) for i in range(len(cache.layers))]}


def _check_split_model(rank: int, folder: str) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.distributed.configuration_utils import DistributedConfig

    from obcache.loading import load_tokenizer

    tokenizer = load_tokenizer()
    for family, reference in torch.load(f"{folder}/reference.pt").items():
        model = AutoModelForCausalLM.from_pretrained(f"{folder}/{family}",
                                                     distributed_config=DistributedConfig(tp_size=2)).eval()
        group = obcache.tensor_parallel_group(model)
        assert dist.get_world_size(group) == 2
        heads = model.config.num_key_value_heads // 2
        for name, make in _configs(group).items():
            got, expected = _generate(model, tokenizer, make), reference[name]
            assert torch.equal(got["tokens"], expected["tokens"]), (family, name)
            for mine, full in zip(got["kept"], expected["kept"]):  # per layer: per row, per KV head
                for row_mine, row_full in zip(mine, full):
                    assert len(row_mine) == heads, (family, name)
                    for head, positions in enumerate(row_mine):
                        assert torch.equal(positions, row_full[rank * heads + head]), (family, name, head)
        with pytest.raises(ValueError, match="process group"):
            AdaKV(SnapKV(budget=12)).attach(model)


def _split_worker(rank: int, world: int, folder: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a rank left waiting fails, not hangs
    try:
        _check_split_model(rank, folder)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_a_model_split_over_two_ranks_generates_and_keeps_what_one_device_does(tmp_path, tokenizer):
    """Llama, Qwen2 and Qwen3 split by transformers' tensor parallelism (one KV head per rank): the same tokens,
    and each rank's heads hold what the same heads hold on one device, for every mode and score kind."""
    from transformers import AutoModelForCausalLM

    reference = {}
    for family in FAMILIES:
        tiny_model(family, vocab_size=len(tokenizer)).save_pretrained(tmp_path / family)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / family).eval()
        reference[family] = {name: _generate(model, tokenizer, make) for name, make in _configs().items()}
    torch.save(reference, tmp_path / "reference.pt")
    mp.spawn(_split_worker, args=(2, str(tmp_path)), nprocs=2, join=True)


def test_a_group_needs_a_model_split_over_its_ranks(tmp_path):
    """One process, a group of one rank, a model that is not split: a group of 1 matches; a wrong size fails."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_model()
        assert obcache.tensor_parallel_group(model) is None
        with SnapKV(budget=12, window=4, group=dist.group.WORLD).attach(model):
            model(torch.randint(10, 500, (1, 40)))
        model._tp_size = 2  # as a split model says (transformers keeps it there)
        with pytest.raises(ValueError, match="has 1 ranks but the model is split over 2"):
            SnapKV(budget=12, window=4, group=dist.group.WORLD).attach(model)
    finally:
        dist.destroy_process_group()
