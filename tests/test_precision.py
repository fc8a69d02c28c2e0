"""Width pricing and allocation: the distortion model, measured errors, bytes, and the allocator
against brute force (itertools.product) and an independent dynamic program."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch

from obcache.precision import WIDTHS, allocate_widths, bytes_per_token, check_widths, measured_error
from obcache.quantization import quantize
from obcache.scores import saliency

MEASURED = {2: 0.155, 4: 6.1e-3, 8: 2.1e-5, 16: 2.8e-6}  # ε(b) of N(0, 1), groups of 32; 16: bfloat16


def distortion(weights, widths, errors) -> float:
    """sum_p w_p ε(b_p); protected tokens at 16 bits where 16 is not allowed count ε = 0 (a constant)."""
    eps = {0: 1.0, 16: 0.0, **errors}
    return float(sum(w * eps[int(b)] for w, b in zip(weights.double().tolist(), widths.tolist())))


def held(widths, token_bytes) -> int:
    return sum({0: 0, **token_bytes}[int(b)] for b in widths.tolist())


@functools.lru_cache(maxsize=None)
def combos(n: int, k: int) -> np.ndarray:
    return np.array(list(itertools.product(range(k), repeat=n)), dtype=np.int64).reshape(-1, n)


def brute_force(weights, budget, errors, token_bytes, cap, protected):
    """Every feasible assignment: (widths [K, n], distortions [K], bytes [K])."""
    n = weights.numel()
    options = np.array(sorted({0, 16} | set(errors)))
    widths = options[combos(n, len(options))]
    index = combos(n, len(options))
    eps = np.array([{0: 1.0, 16: 0.0, **errors}[int(b)] for b in options])[index]
    cost = np.array([{0: 0, **token_bytes}[int(b)] for b in options])[index].sum(1)
    protect = protected.numpy() if protected is not None else np.zeros(n, bool)
    ok = np.where(protect, widths == 16, np.isin(widths, [0, *errors])).all(1)
    ok &= (cost <= budget) & ((widths > 0).sum(1) <= (n if cap is None else cap))
    return widths[ok], (eps * weights.double().numpy()).sum(1)[ok], cost[ok]


def random_case(rng: np.random.Generator, n: int):
    weights = rng.exponential(size=n) ** rng.uniform(0.5, 4)
    weights[rng.random(n) < 0.15] = 0.0
    if n > 1 and rng.random() < 0.3:
        weights[rng.integers(n)] = weights[rng.integers(n)]  # equal weights: ties by index
    allowed = [b for b in (2, 4, 8, 16) if rng.random() < 0.6]
    kind = rng.random()
    if kind < 0.4:
        errors = {b: MEASURED[b] * rng.uniform(0.5, 2) for b in allowed}
    elif kind < 0.7:  # increasing-accuracy but not convex
        errors = dict(zip(allowed, sorted(rng.uniform(0, 1.2, len(allowed)), reverse=True)))
    else:  # anything, dominated widths included
        errors = {b: float(rng.uniform(0, 1.5)) for b in allowed}
    if rng.random() < 0.5:
        head_dim, group = [(8, 4), (16, 8), (64, 32), (64, 64), (16, 16)][rng.integers(5)]
        token_bytes = {b: bytes_per_token(b, head_dim, group) for b in (2, 4, 8, 16)}
    else:
        token_bytes = {b: int(rng.integers(1, 21)) for b in (2, 4, 8, 16)}
    protected = torch.from_numpy(rng.random(n) < 0.2)
    n_protected = int(protected.sum())
    cap = None if rng.random() < 0.4 else int(rng.integers(n_protected, n + 2))
    floor = n_protected * token_bytes[16]
    most = floor + (n - n_protected) * max(token_bytes.values())
    if rng.random() < 0.5:  # tight: the bytes of some assignment, or one less
        widths = rng.choice([0, *errors], size=n) if errors else np.zeros(n, int)
        budget = floor + sum({0: 0, **token_bytes}[int(b)] for b, p in zip(widths, protected) if not p)
        budget = max(floor, budget - int(rng.integers(0, 2)))
    else:
        budget = int(rng.integers(floor, most + 2))
    return torch.from_numpy(weights), budget, errors, token_bytes, cap, protected if n_protected else None


def test_allocator_equals_brute_force_on_small_cases():
    rng = np.random.default_rng(0)
    unique = 0
    for case in range(600):
        weights, budget, errors, token_bytes, cap, protected = random_case(rng, int(rng.integers(1, 8)))
        widths = allocate_widths(weights, budget, errors, token_bytes, cap=cap, protected=protected)
        candidates, totals, costs = brute_force(weights, budget, errors, token_bytes, cap, protected)
        best = totals.min()
        optimal = totals <= best + 1e-12 * max(best, 1e-300)
        got = distortion(weights, widths, errors)
        assert held(widths, token_bytes) <= budget
        assert int((widths > 0).sum()) <= (weights.numel() if cap is None else cap)
        if protected is not None:
            assert (widths[protected] == 16).all()
        assert got == pytest.approx(best, rel=1e-9, abs=1e-300), case
        matches = (candidates == widths.numpy()).all(1)
        assert matches[optimal].any(), case  # one of the optima
        assert held(widths, token_bytes) == costs[optimal].min(), case  # ties: fewest bytes
        if optimal.sum() == 1:
            unique += 1
            assert matches[optimal].all()
    assert unique > 300  # most cases have a single optimum, and the widths are exactly it


def dynamic_program(weights, budget, errors, token_bytes, cap):
    """Exact optimum by a DP over (tokens at a nonzero width, bytes), numpy; no protected tokens."""
    unit = math.gcd(*token_bytes.values())
    slots = weights.numel() if cap is None else min(cap, weights.numel())
    size = budget // unit + 1
    best = np.full((slots + 1, size), np.inf)
    best[0, 0] = 0.0
    for w in weights.double().tolist():
        new = best + w  # evicted
        for width, error in errors.items():
            step = token_bytes[width] // unit
            if step < size:
                new[1:, step:] = np.minimum(new[1:, step:], best[:-1, : size - step] + w * error)
        best = new
    return best.min()


@pytest.mark.parametrize("seed", range(6))
def test_allocator_equals_an_exact_dynamic_program_on_larger_pools(seed):
    """Pools much larger than the proximity box, so the box really prunes: still the exact optimum."""
    rng = np.random.default_rng(100 + seed)
    for case in range(12):
        n = int(rng.integers(60, 160))
        weights = torch.from_numpy(rng.exponential(size=n) ** 3)
        weights[torch.from_numpy(rng.random(n) < 0.1)] = 0.0
        if seed % 2:
            token_bytes = {b: bytes_per_token(b, 16, 8) for b in (2, 4, 8, 16)}  # 6, 10, 18, 32: R = 31
        else:
            token_bytes = {2: 1, 4: 2, 8: 3, 16: 5}  # R = 9
        errors = {b: MEASURED[b] * rng.uniform(0.3, 3) for b in (2, 4, 8, 16) if rng.random() < 0.8}
        if rng.random() < 0.5:
            errors = dict(zip(errors, sorted(rng.uniform(0, 1, len(errors)), reverse=True)))
        cap = None if case % 3 == 0 else int(rng.integers(1, n))
        budget = int(rng.integers(0, n * token_bytes[16] // 2))
        widths = allocate_widths(weights, budget, errors, token_bytes, cap=cap)
        assert held(widths, token_bytes) <= budget
        assert distortion(weights, widths, errors) == pytest.approx(
            dynamic_program(weights, budget, errors, token_bytes, cap), rel=1e-9)


def test_allocator_beats_the_lagrangian_fill_where_it_stops_short():
    # 16 bits costs 4 bytes and loses nothing, 2 bits costs 3 and loses 0.4: not on the convex hull,
    # so the fill would put one token at 16 bits (distortion 1.0); two at 2 bits give 0.8.
    widths = allocate_widths(torch.tensor([1.0, 1.0]), 6, {2: 0.4, 16: 0.0}, {2: 3, 16: 4})
    assert widths.tolist() == [2, 2]
    # equal weights: the earlier token gets the wider width
    widths = allocate_widths(torch.tensor([1.0, 1.0, 1.0]), 7, {2: 0.1, 16: 0.0}, {2: 3, 16: 4})
    assert widths.tolist() == [16, 2, 0]


def test_the_byte_budget_is_never_exceeded():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        n = int(rng.integers(1, 120))
        weights, budget, errors, token_bytes, cap, protected = random_case(rng, n)
        widths = allocate_widths(weights, budget, errors, token_bytes, cap=cap, protected=protected)
        assert held(widths, token_bytes) <= budget
        assert int((widths > 0).sum()) <= (n if cap is None else cap)
        assert set(widths.unique().tolist()) <= {0, 16, *errors}


def test_more_budget_or_a_larger_cap_never_costs_distortion():
    rng = np.random.default_rng(2)
    token_bytes = {b: bytes_per_token(b, 16, 16) for b in (2, 4, 8, 16)}  # 8, 12, 20, 32 bytes
    for _ in range(3):
        weights = torch.from_numpy(rng.exponential(size=300) ** 3)
        errors = {b: MEASURED[b] * rng.uniform(0.8, 1.2) for b in (2, 4, 8, 16)}
        last = math.inf
        for budget in range(0, 300 * 32 + 1, 701):
            current = distortion(weights, allocate_widths(weights, budget, errors, token_bytes), errors)
            assert current <= last * (1 + 1e-12)
            last = current
        last = math.inf
        for cap in range(0, 301, 37):
            current = distortion(weights, allocate_widths(weights, 2500, errors, token_bytes, cap=cap), errors)
            assert current <= last * (1 + 1e-12)
            last = current


def test_allocation_shapes_the_widths_by_weight():
    weights = torch.tensor([0.0, 5.0, 1.0, 3.0, 0.5, 2.0])
    token_bytes = {b: bytes_per_token(b, 64, 32) for b in (2, 4, 8, 16)}
    everything = allocate_widths(weights, 10**6, MEASURED, token_bytes)
    assert everything.tolist() == [0, 16, 16, 16, 16, 16]  # zero weight: no bytes
    nothing = allocate_widths(weights, 0, MEASURED, token_bytes)
    assert nothing.tolist() == [0] * 6
    protected = torch.tensor([True, False, False, False, False, False])
    capped = allocate_widths(weights, 10**6, MEASURED, token_bytes, cap=3, protected=protected)
    assert capped.tolist() == [16, 16, 0, 16, 0, 0]


def test_bad_allocation_input_is_refused_with_clear_errors():
    weights = torch.rand(5)
    token_bytes = {2: 24, 4: 40, 16: 128}
    with pytest.raises(ValueError, match=r"widths must be in \{0, 2, 4, 8, 16\} \(0 = evicted\), got \[3\]"):
        allocate_widths(weights, 100, {3: 0.1}, token_bytes)
    with pytest.raises(ValueError, match="leave 0 out of errors"):
        allocate_widths(weights, 100, {0: 1.0, 2: 0.1}, token_bytes)
    protected = torch.tensor([True, True, False, False, False])
    with pytest.raises(ValueError, match=r"the 2 protected tokens need 256 bytes at 16 bits \(2 x 128\), "
                                         r"more than the byte budget 200"):
        allocate_widths(weights, 200, {2: 0.1}, token_bytes, protected=protected)
    with pytest.raises(ValueError, match="cap must be an int >= the 2 protected tokens, got 1"):
        allocate_widths(weights, 1000, {2: 0.1}, token_bytes, cap=1, protected=protected)
    with pytest.raises(ValueError, match="finite and >= 0"):
        allocate_widths(torch.tensor([1.0, -0.5]), 100, {2: 0.1}, token_bytes)
    with pytest.raises(ValueError, match="finite and >= 0"):
        allocate_widths(torch.tensor([1.0, math.nan]), 100, {2: 0.1}, token_bytes)
    with pytest.raises(ValueError, match=r"token_bytes\[8\] must be a positive int"):
        allocate_widths(weights, 100, {8: 0.1}, token_bytes)
    with pytest.raises(ValueError, match="byte_budget must be an int"):
        allocate_widths(weights, 0.5, {2: 0.1}, token_bytes)
    with pytest.raises(ValueError, match="protected must be a bool tensor of shape"):
        allocate_widths(weights, 100, {2: 0.1}, token_bytes, protected=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"errors\[2\] must be a finite number >= 0"):
        allocate_widths(weights, 100, {2: -0.1}, token_bytes)
    assert check_widths([2, 16, 0, 16]) == (16, 2, 0)


@pytest.mark.parametrize("head_dim,group_size", [(64, 32), (64, 64), (128, 32), (8, 4)])
def test_bytes_per_token_match_what_the_quantizer_holds(head_dim, group_size):
    x = torch.randn(2, 3, 2 * group_size, head_dim)
    tokens = x.numel() // head_dim
    for bits in (2, 4, 8):
        for axis in (-1, -2):
            if x.shape[axis] % group_size == 0:
                assert quantize(x, bits, group_size, axis).nbytes() == tokens * bytes_per_token(bits, head_dim,
                                                                                                group_size)
    assert bytes_per_token(16, head_dim, group_size) == x.to(torch.bfloat16).nbytes // tokens
    assert bytes_per_token(0, head_dim, group_size) == 0
    with pytest.raises(ValueError, match="no whole number of bytes"):
        bytes_per_token(4, 64, 48)
    with pytest.raises(ValueError, match="widths must be in"):
        bytes_per_token(6, 64, 32)


def test_measured_error_by_width():
    x = torch.randn(4, 512, 64, generator=torch.Generator().manual_seed(0))
    errors = [measured_error(x, b, 32) for b in WIDTHS]
    assert errors[0] == 1.0 and all(a > b for a, b in zip(errors, errors[1:]))
    # 8 bits: uniform rounding, E e^2 = Δ^2 / 12 with Δ = (max - min) / 255 per group, except that
    # each group's min and max come back (almost) exactly: 30 of 32 elements carry the noise
    step = x.unflatten(-1, (2, 32)).aminmax(dim=-1)
    expected = float((((step.max - step.min) / 255) ** 2 / 12).mean() / x.square().mean()) * 30 / 32
    assert errors[3] == pytest.approx(expected, rel=0.05)
    assert measured_error(x.to(torch.bfloat16), 16, 32) == 0.0  # already 16-bit: stored as is
    assert measured_error(x.half(), 16, 32, full_dtype=torch.bfloat16) == 0.0
    assert measured_error(x, 16, 32, full_dtype=torch.bfloat16) > 10 * errors[4]  # float16 by default
    with pytest.raises(ValueError, match="all zero"):
        measured_error(torch.zeros(2, 64), 4, 32)


def test_distortion_model_value_exact_and_key_first_order():
    """D_p = S_p ||e_p||^2 / ||v_p||^2 exactly for values; the key line to first order."""
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, n, 16, generator=generator, dtype=torch.float64) for n in (6, 20, 20))
    scaling = 0.25
    positions = torch.arange(14, 20)
    causal = torch.arange(20)[None, :] <= positions[:, None]

    def outputs(keys, values):
        logits = (scaling * q[0, 0] @ keys[0, 0].T).masked_fill(~causal, -math.inf)
        return torch.softmax(logits, -1) @ values[0, 0]

    base = outputs(k, v)
    score_v = saliency(q, k, v, "obc-value", scaling=scaling, query_positions=positions)[0, 0].double()
    score_k = saliency(q, k, v, "obc-key", scaling=scaling, query_positions=positions)[0, 0].double()
    stored = quantize(v.float(), 2, 8).dequantize().double()
    for p in (0, 7, 15):
        changed = v.clone()
        changed[0, 0, p] = stored[0, 0, p]
        change = (outputs(k, changed) - base).square().sum()
        error = (v[0, 0, p] - stored[0, 0, p]).square().sum() / v[0, 0, p].square().sum()
        assert float(change) == pytest.approx(float(score_v[p] * error), rel=1e-4)  # float32 score
        # key: a small perturbation along k_p itself, δk = -t k_p, changes the output by t^2 S_p to first order
        shrunk = k.clone()
        shrunk[0, 0, p] *= 1 - 1e-4
        change = (outputs(shrunk, v) - base).square().sum()
        assert float(change) == pytest.approx(float(score_k[p]) * 1e-8, rel=1e-3)


def test_logit_noise_is_the_rms_logit_error_of_the_stored_keys():
    from obcache.precision import logit_noise
    from obcache.quantization import quantize

    generator = torch.Generator().manual_seed(5)
    queries, keys = torch.randn(6, 16, generator=generator), torch.randn(40, 16, generator=generator)
    stored = quantize(keys, 4, 8).dequantize().double()
    by_hand = [(0.25 * float(q.double() @ (k_hat - k.double()))) ** 2 for q in queries for k, k_hat in zip(keys, stored)]
    assert logit_noise(queries, keys, 4, 8, 0.25) == pytest.approx(math.sqrt(sum(by_hand) / len(by_hand)), rel=1e-9)
    assert logit_noise(queries, keys, 8, 8, 0.25) < logit_noise(queries, keys, 4, 8, 0.25)
    with pytest.raises(ValueError, match="quantized width"):
        logit_noise(queries, keys, 16, 8, 0.25)
