"""Selection and budget allocation: head sharing, spans, AdaKV, PyramidKV, against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from obcache import H2O, TOVA, AdaKV, PyramidKV, SnapKV, StreamingLLM
from obcache.policies import allocate, policy_allocation, policy_label
from obcache.selection import adaptive_mask, chunk_scores, combine_heads, pyramid_budgets, top_k_mask
from tests.test_policies import B, HKV, L, synthetic_layer


def test_top_k_mask_keeps_the_k_best_and_breaks_ties_by_position():
    scores = torch.tensor([[[3.0, 1.0, 3.0, 2.0, 3.0]]])
    assert top_k_mask(scores, 2).tolist() == [[[True, False, True, False, False]]]
    assert top_k_mask(scores, 4).tolist() == [[[True, False, True, True, True]]]


def test_chunk_scores_are_span_means_written_out():
    scores = torch.arange(10, dtype=torch.float32).view(1, 1, 10)
    expected = [1.0] * 3 + [4.0] * 3 + [7.0] * 3 + [9.0]  # spans [0..2], [3..5], [6..8], [9]
    assert chunk_scores(scores, 3)[0, 0].tolist() == expected
    assert torch.equal(chunk_scores(scores, 1), scores)


def test_combine_heads_by_hand():
    scores = torch.tensor([[[1.0, 3.0], [10.0, 30.0]]])  # two heads, very different scales
    assert combine_heads(scores, "mean").tolist() == [[[5.5, 16.5]]]
    assert combine_heads(scores, "normalized-mean").tolist() == [[[0.25, 0.75]]]
    assert combine_heads(scores, "max").tolist() == [[[0.25, 0.75]]]


@pytest.mark.parametrize("kept,floor", [(12, 3), (20, 1), (20, 20), (7, 2)])
def test_adaptive_mask_conserves_the_total_and_the_floor(kept, floor):
    generator = torch.Generator().manual_seed(kept)
    scores = torch.rand(B, 4, L, generator=generator) ** 4  # skewed: some heads want far more
    mask = adaptive_mask(scores, kept, floor)
    counts = mask.sum(-1)
    assert (counts.sum(-1) == kept * 4).all() and (counts >= floor).all()
    # the kept set is the per-head floor plus the best of the rest, computed here by brute force
    for b in range(B):
        expected = torch.zeros(4, L, dtype=torch.bool)
        for h in range(4):
            expected[h, scores[b, h].argsort(descending=True)[:floor]] = True
        rest = scores[b].masked_fill(expected, -1.0).flatten()
        expected.view(-1)[rest.argsort(descending=True)[: (kept - floor) * 4]] = True
        assert torch.equal(mask[b], expected)


@pytest.mark.parametrize("scored,layers,beta,capacity", [(100, 30, 20, 1000), (7, 5, 2.0, 50), (300, 8, 1.0, 400),
                                                         (400, 4, 20, 500)])
def test_pyramid_budgets_fall_with_depth_and_keep_the_mean(scored, layers, beta, capacity):
    budgets = pyramid_budgets(scored, layers, beta, capacity)
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert sum(budgets) == scored * layers and max(budgets) <= capacity
    if beta > 1 and 2 * scored - scored / beta <= capacity:
        assert budgets[0] == pytest.approx(2 * scored - scored / beta, abs=1)
        assert budgets[-1] == pytest.approx(scored / beta, abs=1)


def test_adakv_wraps_any_policy_total_and_safeguard_per_layer():
    layer = synthetic_layer(seed=3)
    for policy in (SnapKV(budget=20, window=4, score="obc-joint"), TOVA(budget=20, score="obc-key"),
                   H2O(budget=20, window=2, score="attention", chunk=4)):
        mask = AdaKV(policy, alpha=0.5).select(layer)
        counts = mask.sum(-1)
        assert (counts.sum(-1) == 20 * HKV).all()
        assert (counts >= math.ceil(0.5 * 20)).all()
        assert mask[..., L - policy.window_protected :].all()  # protected tokens stay in every head


def test_pyramid_layers_get_falling_budgets_whose_mean_is_the_budget():
    policy = PyramidKV(SnapKV(budget=20, window=4, score="obc-joint"), beta=4)
    counts = []
    for layer_idx in range(6):
        layer = synthetic_layer(seed=layer_idx)
        layer.layer_idx, layer.num_layers = layer_idx, 6
        mask = policy.select(layer)
        counts.append(int(mask[0, 0].sum()) if mask is not None else L)
    assert counts == sorted(counts, reverse=True) and sum(counts) == 20 * 6
    assert counts[-1] == 4 + round(16 / 4)  # protected window + scored / beta


def test_adakv_over_pyramid_composes():
    policy = AdaKV(PyramidKV(SnapKV(budget=20, window=4, score="obc-value"), beta=4), alpha=0.25)
    layer = synthetic_layer(seed=9)
    layer.layer_idx, layer.num_layers = 5, 6
    mask = policy.select(layer)
    budget = policy.policy.layer_budgets(L, 6)[5]
    assert (mask.sum(-1).sum(-1) == budget * HKV).all() and (mask.sum(-1) >= math.ceil(0.25 * budget)).all()


def test_allocation_names_compose_outermost_first_and_round_trip():
    policy = allocate(SnapKV(budget=20, score="obc-key"), "adakv+pyramid", alpha=0.3, beta=5)
    assert type(policy) is AdaKV and type(policy.policy) is PyramidKV and type(policy.policy.policy) is SnapKV
    assert (policy.alpha, policy.policy.beta) == (0.3, 5) and policy_allocation(policy) == "adakv+pyramid"
    assert policy_label(policy) == "adakv(pyramid(snapkv))"
    with pytest.raises(ValueError, match="unknown allocation 'pyramid\\+adakv'.*adakv\\+pyramid"):
        allocate(SnapKV(budget=20, score="obc-key"), "pyramid+adakv")


@pytest.mark.parametrize("make", [lambda: SnapKV(budget=16, window=4, selection="shared", score="obc-joint"),
                                  lambda: TOVA(budget=16, selection="shared", chunk=4, score="obc-key"),
                                  lambda: H2O(budget=16, window=3, selection="shared", combine="max")])
def test_shared_selection_keeps_the_same_tokens_in_every_head(make):
    mask = make().select(synthetic_layer(seed=5))
    for b in range(B):
        assert all(torch.equal(mask[b, 0], mask[b, h]) for h in range(HKV))


def test_span_selection_keeps_whole_spans_but_the_last():
    policy = TOVA(budget=16, chunk=4, score="obc-joint")
    mask = policy.select(synthetic_layer(seed=7))
    spans = mask.view(B, HKV, L // 4, 4).sum(-1)  # tokens kept per span
    assert ((spans == 0) | (spans == 4)).all() and (spans.sum(-1) == 16).all()


@pytest.mark.parametrize("build,message", [
    (lambda: AdaKV(SnapKV(), alpha=1.5), "alpha must be a number in \\[0, 1\\]"),
    (lambda: AdaKV(SnapKV(), alpha=-0.1), "alpha"),
    (lambda: AdaKV(SnapKV(selection="shared")), "per-head"),
    (lambda: PyramidKV(SnapKV(), beta=0.5), "beta must be a number >= 1"),
    (lambda: SnapKV(chunk=0), "chunk must be an int >= 1"),
    (lambda: SnapKV(budget=8, window=4, chunk=16), "chunk 16 is larger than the budget of 8"),
    (lambda: SnapKV(selection="everyone"), "unknown selection 'everyone'; allowed: per-head, shared"),
    (lambda: SnapKV(combine="median"), "unknown head combine"),
    (lambda: SnapKV(gqa="max"), "unknown gqa reduction"),
    (lambda: SnapKV(score=None), "needs a score"),
])
def test_bad_selection_settings_are_rejected_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_chunk_larger_than_a_fractional_budget_is_rejected_with_the_prompt():
    with pytest.raises(ValueError, match="chunk 32 is larger than the 10 tokens"):
        SnapKV(budget=0.1, window=4, chunk=32).check_prompt([100])
    with pytest.raises(ValueError, match="protected"):
        AdaKV(SnapKV(budget=3, window=8)).check_prompt([100])


def test_wrappers_need_a_policy():
    with pytest.raises(TypeError, match="wraps a policy"):
        AdaKV("snapkv")
    assert AdaKV(StreamingLLM(budget=10)).budget == 10  # options of the wrapped policy read through
