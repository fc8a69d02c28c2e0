"""Saliency scores against independent float64 brute force (perturb a token, recompute outputs)."""

from __future__ import annotations

import pytest
import torch

from obcache.scores import EXACT_REMOVAL_EPS, SCORE_KINDS, check_score_kind, saliency

B, HKV, G, W, L, D = 2, 2, 3, 4, 12, 8
SCALE = D**-0.5
KINDS = list(SCORE_KINDS)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add latency (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(seed: int = 0, batch: int = B, heads_kv: int = HKV, group: int = G, width: int = W, length: int = L):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads_kv * group, width, D, generator=gen)
    k = torch.randn(batch, heads_kv, length, D, generator=gen)
    v = torch.randn(batch, heads_kv, length, D, generator=gen)
    return q, k, v


# ---------------------------------------------------------------- float64 brute force


def causal_mask(positions, keep, length):
    """[W, L] bool: query j sees key p iff p <= positions[j] and keep[p] (explicit loops)."""
    mask = torch.zeros(len(positions), length, dtype=torch.bool)
    for j, position in enumerate(positions):
        for p in range(length):
            mask[j, p] = p <= position and bool(keep[p])
    return mask


def head_outputs(q, k, v, mask):
    """One query head, float64: q [W, d], k/v [..., L, d], mask [..., W, L] -> o [..., W, d], A [..., W, L]."""
    logits = SCALE * (q @ k.transpose(-1, -2))
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)  # nothing seen: 0
    return weights @ v, weights


def brute_force(q, k, v, kind, positions=None, key_mask=None, fd_step=1e-5, reduce="sum"):
    """Score [B, Hkv, L] in float64: perturb each token p (batched over p) and recompute every output.

    reduce: "sum" of every (query head, query) term, or their "max"."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads_q, width, _ = q.shape
    heads_kv, length = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    positions = list(range(length - width, length)) if positions is None else [int(p) for p in positions]
    key_mask = torch.ones(batch, length, dtype=torch.bool) if key_mask is None else key_mask
    eye = torch.eye(length, dtype=torch.bool)  # row p: the token perturbed in copy p
    out = torch.zeros(batch, heads_kv, length, dtype=torch.float64)
    for b in range(batch):
        mask = causal_mask(positions, key_mask[b], length)
        for h in range(heads_q):
            kv = h // group
            qh, kh, vh = q[b, h], k[b, kv], v[b, kv]
            o, weights = head_outputs(qh, kh, vh, mask)
            ks, vs = kh.expand(length, length, -1), vh.expand(length, length, -1)  # [p, L, d]
            if kind == "attention":
                terms = weights  # [W, L]
                out[b, kv] = out[b, kv] + terms.sum(0) if reduce == "sum" else torch.maximum(out[b, kv], terms.max(0).values)
                continue
            if kind == "obc-value":  # v_p := 0
                change = head_outputs(qh, ks, vs.masked_fill(eye[..., None], 0.0), mask)[0] - o
            elif kind == "exact-removal":  # token p deleted, softmax renormalised
                change = head_outputs(qh, ks, vs, mask & ~eye[:, None, :])[0] - o
            else:  # d o / dt at t = 0 for k_p (and v_p) -> (1 - t) k_p, by central differences

                def at(t):
                    scale = (1.0 - t * eye.double())[..., None]  # [p, L, 1]: 1 - t on token p
                    return head_outputs(qh, ks * scale, vs * scale if kind == "obc-joint" else vs, mask)[0]

                change = (at(fd_step) - at(-fd_step)) / (2 * fd_step)  # [p, W, d] Jacobian-vector product
            terms = change.square().sum(-1).T  # [W, p]: one query's squared output change per token
            out[b, kv] = out[b, kv] + terms.sum(0) if reduce == "sum" else torch.maximum(out[b, kv], terms.max(0).values)
    return out


def assert_matches(actual, expected, rtol=2e-5, atol=2e-5):
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- against brute force


@pytest.mark.parametrize("kind", KINDS)
def test_matches_brute_force(kind):
    q, k, v = make(0)
    assert_matches(saliency(q, k, v, kind, scaling=SCALE), brute_force(q, k, v, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_max_over_queries_matches_brute_force(kind):
    """reduce="max": the largest single (query head, query) term of a KV head."""
    q, k, v = make(3)
    positions = torch.tensor([9, 6, 7, 11])  # every query sees >= 4 keys (exact-removal loses precision as A -> 1)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :3] = False
    expected = brute_force(q, k, v, kind, positions=positions, key_mask=key_mask, reduce="max")
    actual = saliency(q, k, v, kind, scaling=SCALE, query_positions=positions, key_mask=key_mask, reduce="max")
    assert_matches(actual, expected)


@pytest.mark.parametrize("reduce", ["sum", "max"])
@pytest.mark.parametrize("kind", KINDS)
def test_scores_of_part_of_the_keys_from_the_log_normalizers(kind, reduce):
    """With each query's lse over every key it sees (float64, written out) and its true output, the scores of
    the first P keys alone equal the brute force over all keys, cut to those P (KVzip's context keys)."""
    q, k, v = make(5)
    positions, part = torch.tensor([7, 9, 10, 11]), 6
    group = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    logits = (q.double() @ kk.transpose(-1, -2) * SCALE).masked_fill(torch.arange(L) > positions[:, None], float("-inf"))
    outputs = logits.softmax(-1) @ vv
    actual = saliency(q, k[:, :, :part], v[:, :, :part], kind, scaling=SCALE, reduce=reduce,
                      query_positions=torch.full((len(positions),), part - 1), outputs=outputs.float(),
                      log_normalizers=logits.logsumexp(-1).float())
    assert_matches(actual, brute_force(q, k, v, kind, positions=positions, reduce=reduce)[..., :part])


@pytest.mark.parametrize("kind", KINDS)
def test_pre_average_max_is_max_of_single_query_scores(kind):
    """With one query, max = sum; so the max over W queries is the max of W single-query pre-averaged scores."""
    q, k, v = make(4)
    positions = [5, 8, 11, 9]
    singles = torch.stack([
        saliency(q[:, :, j : j + 1], k, v, kind, scaling=SCALE, query_positions=[p], gqa="pre-average")
        for j, p in enumerate(positions)
    ])
    actual = saliency(q, k, v, kind, scaling=SCALE, query_positions=positions, gqa="pre-average", reduce="max")
    torch.testing.assert_close(actual, singles.amax(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_brute_force_with_positions_and_padding(kind):
    """Arbitrary (unsorted, repeated) positions and left/inner padding; every query sees >= 2 keys."""
    q, k, v = make(1)
    positions = torch.tensor([9, 4, 7, 9])
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[0, :2] = False
    key_mask[1, 5] = False
    key_mask[1, 10] = False
    expected = brute_force(q, k, v, kind, positions=positions, key_mask=key_mask)
    actual = saliency(q, k, v, kind, scaling=SCALE, query_positions=positions, key_mask=key_mask)
    assert_matches(actual, expected)
    assert (actual[:, :, 10:] == 0).all()  # after every query
    assert (actual[0, :, :2] == 0).all() and (actual[1, :, 5] == 0).all()  # padding


def test_exact_removal_large_weights():
    """Peaked attention (A up to ~0.99): the exact-removal formula still equals real deletion."""
    q, k, v = make(2)
    q = q * 4
    mask = causal_mask(range(L - W, L), [1] * L, L)
    largest = max(
        head_outputs(q[b, h].double(), k[b, h // G].double(), v[b, h // G].double(), mask)[1].max()
        for b in range(B)
        for h in range(HKV * G)
    )
    assert 0.95 < largest < 1 - 1e-3
    assert_matches(saliency(q, k, v, "exact-removal", scaling=SCALE), brute_force(q, k, v, "exact-removal"), rtol=1e-3)


def test_attention_scores_sum_to_query_count():
    q, k, v = make(3)
    scores = saliency(q, k, v, "attention", scaling=SCALE)
    torch.testing.assert_close(scores.sum(-1), torch.full((B, HKV), float(G * W)))


# ---------------------------------------------------------------- structure: GQA, causality, masks


@pytest.mark.parametrize("kind", KINDS)
def test_gqa_is_sum_of_single_heads(kind):
    q, k, v = make(4)
    grouped = saliency(q, k, v, kind, scaling=SCALE)
    single = torch.zeros_like(grouped)
    for h in range(HKV * G):
        kv = h // G
        single[:, kv] += saliency(q[:, h : h + 1], k[:, kv : kv + 1], v[:, kv : kv + 1], kind, scaling=SCALE)[:, 0]
    torch.testing.assert_close(grouped, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_window_is_sum_of_causal_single_queries(kind):
    """Default window: query j sits at L - W + j and sees exactly keys 0..L-W+j."""
    q, k, v = make(5)
    window = saliency(q, k, v, kind, scaling=SCALE)
    total = torch.zeros_like(window)
    for j in range(W):
        one = saliency(q[:, :, j : j + 1], k, v, kind, scaling=SCALE, query_positions=[L - W + j])
        assert (one[..., L - W + j + 1 :] == 0).all()
        total += one
    torch.testing.assert_close(window, total, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_query_does_not_see_later_keys(kind):
    q, k, v = make(6)
    middle = 6
    scores = saliency(q[:, :, :1], k, v, kind, scaling=SCALE, query_positions=[middle])
    k2, v2 = k.clone(), v.clone()
    k2[:, :, middle + 1 :] = 100.0 * torch.randn_like(k2[:, :, middle + 1 :])
    v2[:, :, middle + 1 :] = -7.0
    assert torch.equal(scores, saliency(q[:, :, :1], k2, v2, kind, scaling=SCALE, query_positions=[middle]))
    assert (scores[..., middle + 1 :] == 0).all() and (scores[..., : middle + 1] > 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_default_positions_equal_explicit(kind):
    q, k, v = make(7)
    torch.testing.assert_close(
        saliency(q, k, v, kind, scaling=SCALE),
        saliency(q, k, v, kind, scaling=SCALE, query_positions=torch.arange(L - W, L)),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_equals_unpadded(kind):
    """Padding keys score 0 and do not change the other tokens' scores."""
    q, k, v = make(8)
    pad = 3
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[0, :pad] = False
    padded = saliency(q, k, v, kind, scaling=SCALE, key_mask=key_mask)
    assert (padded[0, :, :pad] == 0).all()
    unpadded = saliency(q[:1], k[:1, :, pad:], v[:1, :, pad:], kind, scaling=SCALE)
    torch.testing.assert_close(padded[0, :, pad:], unpadded[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded[1], saliency(q[1:], k[1:], v[1:], kind, scaling=SCALE)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_query_seeing_nothing_contributes_zero(kind):
    q, k, v = make(9)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[:, :6] = False  # the query at position 2 sees only padding
    both = saliency(q[:, :, :2], k, v, kind, scaling=SCALE, query_positions=[2, 11], key_mask=key_mask)
    last = saliency(q[:, :, 1:2], k, v, kind, scaling=SCALE, query_positions=[11], key_mask=key_mask)
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both, last)


def test_integer_key_mask_accepted():
    q, k, v = make(10)
    key_mask = torch.ones(B, L, dtype=torch.long)
    key_mask[1, :4] = 0
    torch.testing.assert_close(
        saliency(q, k, v, "obc-joint", scaling=SCALE, key_mask=key_mask),
        saliency(q, k, v, "obc-joint", scaling=SCALE, key_mask=key_mask.bool()),
    )


def test_exact_removal_sole_visible_key_is_huge_and_finite():
    q, k, v = make(11)
    scores = saliency(q[:, :, :1], k, v, "exact-removal", scaling=SCALE, query_positions=[0])
    assert torch.isfinite(scores).all()
    value_norms = v[:, :, 0].square().sum(-1)
    torch.testing.assert_close(scores[..., 0], G * value_norms / EXACT_REMOVAL_EPS**2, rtol=1e-4, atol=0)
    assert (scores[..., 1:] == 0).all()
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[:, :5] = False  # the query at position 5 sees key 5 only
    scores = saliency(q, k, v, "exact-removal", scaling=SCALE, query_positions=[5, 9, 10, 11], key_mask=key_mask)
    assert torch.isfinite(scores).all()
    assert (scores[..., 5] > 1e10 * v[:, :, 5].square().sum(-1)).all()
    assert (scores[..., 6:] < 1e6).all()
    for kind in KINDS:  # no other kind misbehaves there
        out = saliency(q[:, :, :1], k, v, kind, scaling=SCALE, query_positions=[0])
        assert torch.isfinite(out).all() and (out[..., 1:] == 0).all()


# ---------------------------------------------------------------- dtypes and identities


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs_computed_in_float32(kind, dtype):
    q, k, v = make(12)
    low = saliency(q.to(dtype), k.to(dtype), v.to(dtype), kind, scaling=SCALE)
    assert low.dtype == torch.float32 and low.shape == (B, HKV, L)
    rounded = [t.to(dtype).float() for t in (q, k, v)]
    torch.testing.assert_close(low, saliency(*rounded, kind, scaling=SCALE), rtol=1e-5, atol=1e-6)
    reference = saliency(q, k, v, kind, scaling=SCALE)
    torch.testing.assert_close(low, reference, rtol=0.1, atol=0.05 * reference.abs().max().item())


def test_joint_is_value_plus_key_plus_cross_term():
    q, k, v = make(13)
    joint = saliency(q, k, v, "obc-joint", scaling=SCALE)
    value = saliency(q, k, v, "obc-value", scaling=SCALE)
    key = saliency(q, k, v, "obc-key", scaling=SCALE)
    cross = torch.zeros(B, HKV, L, dtype=torch.float64)
    mask = causal_mask(range(L - W, L), [1] * L, L)
    for b in range(B):
        for h in range(HKV * G):
            qh, kh, vh = q[b, h].double(), k[b, h // G].double(), v[b, h // G].double()
            o, weights = head_outputs(qh, kh, vh, mask)  # o [W, d], A [W, L]; A = 0 where hidden
            logits = SCALE * (qh @ kh.T)
            value_norms = (vh * vh).sum(-1)  # [L]
            inner = o @ vh.T  # [W, L] <v_p, o_i>
            cross[b, h // G] += (2 * weights**2 * logits * (value_norms - inner)).sum(0)
    assert cross.abs().max() > 0.1  # the identity is not trivially satisfied
    torch.testing.assert_close((value + key).double() + cross, joint.double(), rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_scores_nonnegative_shape_dtype(kind):
    q, k, v = make(14, length=20, width=5)
    scores = saliency(q.double(), k.double(), v.double(), kind, scaling=0.3)
    assert scores.dtype == torch.float64 and scores.shape == (B, HKV, 20)  # float64 in, float64 out
    assert (scores >= 0).all() and torch.isfinite(scores).all()
    assert saliency(q.half(), k.half(), v.half(), kind, scaling=0.3).dtype == torch.float32  # else float32


# ---------------------------------------------------------------- validation


def test_score_kinds_and_check():
    assert set(SCORE_KINDS) == {"attention", "obc-value", "obc-key", "obc-joint", "exact-removal"}
    assert "not OBCache" in SCORE_KINDS["exact-removal"]
    for kind in KINDS:
        assert check_score_kind(kind) == kind
    with pytest.raises(ValueError, match="obc-joint") as info:
        check_score_kind("obc")
    assert all(kind in str(info.value) for kind in KINDS)
    q, k, v = make(15)
    with pytest.raises(ValueError, match="allowed kinds"):
        saliency(q, k, v, "snapkv", scaling=SCALE)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, k, v: (q[:, :5], k, v, {}), "multiple of KV heads"),
        (lambda q, k, v: (q[..., :4], k, v, {}), "head_dim mismatch"),
        (lambda q, k, v: (q, k, v[:, :, :5], {}), "must match keys"),
        (lambda q, k, v: (q[:1], k, v, {}), "batch sizes differ"),
        (lambda q, k, v: (q[0], k, v, {}), "4-D"),
        (lambda q, k, v: (q.long(), k, v, {}), "floating-point"),
        (lambda q, k, v: (q[:, :, :0], k, v, {}), "empty"),
        (lambda q, k, v: (torch.randn(B, HKV * G, L + 1, D), k, v, {}), "longer than"),
        (lambda q, k, v: (q, k, v, {"query_positions": [1, 2, 3]}), "shape"),
        (lambda q, k, v: (q, k, v, {"query_positions": [1, 2, 3, L]}), r"\[0, 11\]"),
        (lambda q, k, v: (q, k, v, {"query_positions": [-1, 2, 3, 4]}), r"\[0, 11\]"),
        (lambda q, k, v: (q, k, v, {"query_positions": [1.0, 2.0, 3.0, 4.0]}), "integers"),
        (lambda q, k, v: (q, k, v, {"key_mask": torch.ones(B, L - 1, dtype=torch.bool)}), "key_mask"),
        (lambda q, k, v: (q, k, v, {"key_mask": torch.zeros(B, L)}), "bool"),
        (lambda q, k, v: (q, k, v, {"scaling": float("nan")}), "scaling"),
    ],
)
def test_validation_errors(change, message):
    q, k, v, extra = change(*make(16))
    kwargs = {"scaling": SCALE, **extra}
    with pytest.raises(ValueError, match=message):
        saliency(q, k, v, "obc-joint", **kwargs)


# ---------------------------------------------------------------- captured attention outputs


@pytest.mark.parametrize("kind", KINDS)
def test_given_outputs_equal_recomputed(kind):
    """Scores from the model's own outputs o_i (captured) equal those recomputing o = A v."""
    q, k, v = make(seed=7)
    positions = torch.tensor([3, 7, 9, 11])
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :4] = False  # left padding: query 0 of row 1 (position 3) sees nothing
    mask = torch.stack([causal_mask(positions, key_mask[b], L) for b in range(B)])  # [B, W, L]
    logits = SCALE * q.double() @ k.double().repeat_interleave(G, 1).transpose(-1, -2)
    weights = logits.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    outputs = weights @ v.double().repeat_interleave(G, 1)  # NaN rows where a query sees nothing, as a model may give
    expected = saliency(q, k, v, kind, scaling=SCALE, query_positions=positions, key_mask=key_mask)
    actual = saliency(q, k, v, kind, scaling=SCALE, query_positions=positions, key_mask=key_mask, outputs=outputs.float())
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert_matches(actual, brute_force(q, k, v, kind, positions, key_mask))


def test_given_outputs_are_validated_and_left_untouched():
    q, k, v = make()
    outputs = torch.randn(B, HKV * G, W, D)
    copy = outputs.clone()
    saliency(q, k, v, "obc-joint", scaling=SCALE, outputs=outputs)
    assert torch.equal(outputs, copy)
    with pytest.raises(ValueError, match="outputs must have shape"):
        saliency(q, k, v, "obc-joint", scaling=SCALE, outputs=outputs[:, :, :-1])
