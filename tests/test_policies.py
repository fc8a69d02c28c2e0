"""Policies on synthetic layers: budgets, protection, pooling, chunking, presets, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from obcache import H2O, TOVA, SnapKV, StreamingLLM, make_policy, paper_preset
from obcache.policies.base import LayerState
from obcache.scores import saliency
from tests.conftest import kept_indices

B, HKV, G, L, D = 2, 2, 3, 48, 8


def synthetic_layer(seed: int = 0, key_mask: torch.Tensor | None = None) -> LayerState:
    generator = torch.Generator().manual_seed(seed)
    all_queries = torch.randn(B, HKV * G, L, D, generator=generator)
    keys = torch.randn(B, HKV, L, D, generator=generator)
    values = torch.randn(B, HKV, L, D, generator=generator)
    return LayerState(
        keys=keys, values=values, scaling=0.3, query_heads=HKV * G, key_mask=key_mask,
        queries=lambda first, last: all_queries[:, :, first:last],
    )


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize("budget,prompt,kept", [(0.1, 1000, 100), (0.25, 48, 12), (1.0, 48, 48), (20, 48, 20), (100, 48, 48), (0.001, 48, 1)])
def test_kept_tokens(budget, prompt, kept):
    assert SnapKV(budget=budget, window=1).kept_tokens(prompt) == kept


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, 0, -3])
def test_budget_out_of_range_is_rejected(budget):
    with pytest.raises(ValueError, match="out of range"):
        SnapKV(budget=budget)


@pytest.mark.parametrize("budget", ["0.1", None, True, [1]])
def test_budget_of_wrong_type_is_rejected(budget):
    with pytest.raises(TypeError, match="fraction kept"):
        H2O(budget=budget)


def test_unknown_names_list_the_allowed_values():
    with pytest.raises(ValueError, match="h2o, tova, snapkv, streamingllm"):
        make_policy("lru")
    with pytest.raises(ValueError, match="obc-joint"):
        SnapKV(score="obc")
    with pytest.raises(ValueError, match="max, avg, none"):
        SnapKV(pooling="min")
    with pytest.raises(ValueError, match="odd"):
        SnapKV(kernel=4)
    with pytest.raises(ValueError, match="window"):
        H2O(window=0)
    with pytest.raises(ValueError, match="takes no score"):
        make_policy("streamingllm", score="attention")


def test_check_prompt_names_the_problem():
    with pytest.raises(ValueError, match="shorter than the policy's query window"):
        SnapKV(window=32).check_prompt([20])
    with pytest.raises(ValueError, match="protected"):
        H2O(budget=0.01, window=16).check_prompt([1000])  # keeps 10 < 16 recent tokens
    StreamingLLM(budget=4, sinks=4).check_prompt([100])  # exactly the sinks: allowed


# ---------------------------------------------------------------- selection


def test_selection_is_topk_of_scores_plus_protected_in_position_order():
    layer = synthetic_layer()
    policy = H2O(budget=20, window=5, score="obc-joint")
    indices = kept_indices(policy.select(layer))
    scores = saliency(layer.queries(L - 5, L), layer.keys, layer.values, "obc-joint", scaling=0.3)
    for b in range(B):
        for h in range(HKV):
            expected = set(range(L - 5, L)) | set(scores[b, h, : L - 5].topk(15).indices.tolist())
            assert indices[b, h].tolist() == sorted(expected)


def test_tova_uses_the_last_query_only():
    layer = synthetic_layer()
    indices = kept_indices(TOVA(budget=10, score="attention").select(layer))
    last = layer.queries(L - 1, L).view(B, HKV, G, 1, D)
    weights = (0.3 * last @ layer.keys.unsqueeze(2).transpose(-1, -2)).softmax(-1).sum(2).squeeze(2)
    expected = weights.topk(10).indices.sort(-1).values
    assert torch.equal(indices, expected)


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_pools_the_prefix_scores(pooling):
    layer = synthetic_layer()
    policy = SnapKV(budget=16, window=6, pooling=pooling, kernel=5, score="obc-value")
    raw = saliency(layer.queries(L - 6, L), layer.keys, layer.values, "obc-value", scaling=0.3)[..., : L - 6]
    padded = F.pad(raw, (2, 2), value=float("-inf") if pooling == "max" else 0.0)
    windows = padded.unfold(-1, 5, 1)  # [B, Hkv, L - 6, 5], written independently of the policy
    pooled = windows.max(-1).values if pooling == "max" else windows.sum(-1) / 5
    torch.testing.assert_close(policy.token_scores(layer)[..., : L - 6], pooled)
    indices = kept_indices(policy.select(layer))  # max-pooling makes ties: check the top-k property, not one order
    assert torch.equal(indices[..., 10:], torch.arange(L - 6, L).expand(B, HKV, 6))
    chosen = torch.zeros_like(pooled, dtype=torch.bool).scatter_(-1, indices[..., :10], True)
    lowest_kept = pooled.masked_fill(~chosen, float("inf")).min(-1).values
    highest_dropped = pooled.masked_fill(chosen, float("-inf")).max(-1).values
    assert (lowest_kept >= highest_dropped).all()


@pytest.mark.parametrize("chunk_elements", [1, 300, 5000, 1 << 30])
def test_h2o_full_history_in_chunks_equals_one_pass_over_all_queries(chunk_elements):
    layer = synthetic_layer()
    chunked = H2O(budget=12, window=4, full_history=True, chunk_elements=chunk_elements, score="obc-key")
    whole = saliency(layer.queries(0, L), layer.keys, layer.values, "obc-key", scaling=0.3)  # W = L: every query
    torch.testing.assert_close(chunked.token_scores(layer), whole, rtol=1e-5, atol=1e-6)


def test_a_row_with_fewer_real_tokens_than_the_budget_keeps_them_all_and_no_padding():
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, :40] = False  # row 1: 8 real tokens
    layer = synthetic_layer(key_mask=mask)
    chosen = SnapKV(budget=12, window=4, score="obc-joint").select(layer)
    assert torch.equal(chosen[1], mask[1].expand(HKV, -1))  # its 8 real tokens, not a padding slot
    assert chosen[0].sum(-1).tolist() == [12] * HKV


def test_sinks_are_the_first_real_tokens_of_each_row():
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, :7] = False
    layer = synthetic_layer(key_mask=mask)
    indices = kept_indices(StreamingLLM(budget=10, sinks=3).select(layer))
    assert indices[0, 0].tolist() == [7, 8, 9, *range(L - 7, L)]
    assert indices[1, 0].tolist() == [0, 1, 2, *range(L - 7, L)]


def test_budget_that_keeps_everything_selects_nothing():
    assert SnapKV(budget=1.0, window=4).select(synthetic_layer()) is None
    assert SnapKV(budget=L + 5, window=4).select(synthetic_layer()) is None


# ---------------------------------------------------------------- presets


def test_paper_presets():
    niah = paper_preset("niah", "snapkv", score="obc-joint", budget=0.02)
    assert (niah.window, niah.kernel, niah.pooling, niah.score) == (16, 7, "max", "obc-joint")
    assert paper_preset("niah", "tova", score="obc-key", budget=0.05) == TOVA(budget=0.05, score="obc-key")
    # LongBench: window = 5% of the kept tokens (10% of 8000 = 800 kept -> 40)
    assert paper_preset("longbench", "h2o", score="obc-value", budget=0.1, prompt_length=8000).window == 40
    assert paper_preset("niah", "streamingllm", budget=64).sinks == 4
    with pytest.raises(ValueError, match="prompt_length"):
        paper_preset("longbench", "snapkv", budget=0.1)
    with pytest.raises(ValueError, match="niah, longbench"):
        paper_preset("ruler", "snapkv", budget=0.1)


def test_repr_is_a_reproducible_description():
    policy = SnapKV(budget=0.1, score="obc-joint", window=8)
    assert eval(repr(policy), {"SnapKV": SnapKV}) == policy
