"""Bit widths priced by the policy's scores, and one width per token under a byte budget (pure torch).

Distortion model (method.md notation; token p stored with errors e_p on v_p and δk_p on k_p):
- value: Δo_i = A_ip e_p exactly, so sum_i ||Δo_i||^2 = sum_i A_ip^2 ||e_p||^2 = S_p ||e_p||^2 / ||v_p||^2,
  S_p the obc-value score; eviction (e_p = -v_p) costs S_p itself.
- key: Δz_ip = s q_i.δk_p and ∂o_i/∂z_ip = A_ip (v_p - o_i), so Δo_i ≈ A_ip (v_p - o_i) s q_i.δk_p.
- key noise, zero-mean and isotropic: E (q_i.δk_p)^2 = ||q_i||^2 E||δk_p||^2 / d, so E sum_i ||Δo_i||^2 =
  sum_i A_ip^2 ||v_p - o_i||^2 (s ||q_i|| ||k_p||)^2 / d * E||δk_p||^2 / ||k_p||^2.
- key eviction (δk_p = -k_p) costs sum_i A_ip^2 z_ip^2 ||v_p - o_i||^2 = S_p, the obc-key score: z_ip^2 =
  (s q_i.k_p)^2 in place of (s ||q_i|| ||k_p||)^2 / d, equal on average over directions.
- joint and across tokens: independent zero-mean errors add, cross terms vanish in expectation; one
  width for k_p and v_p costs w^v_p ε_v(b) + w^k_p ε_k(b): the form below if ε_k = ε_v, else approximated.
- quantizer: rounding with step Δ gives E||e_p||^2 ≈ d Δ^2 / 12; measured instead on the real one,
  ε(b) = sum ||x - x^_b||^2 / sum ||x||^2 over the pool (`measured_error`): ε(16) ≈ 0, ε(0) = 1 (row lost).
  Measured at head_dim 64, groups of 32, 2/4/8 bits: N(0, 1) 0.155, 6.1e-3, 2.1e-5; SmolLM2's values
  0.170, 6.7e-3, 2.3e-5; its keys in token groups 0.038, 1.5e-3, 5.2e-6; 16: 4.3e-8 (fp16), 2.8e-6 (bf16).
So D_p(b) = w_p ε(b), w_p the policy's score of p: exact at b = 0 for the OBCache scores, with
||e_p||^2 / ||v_p||^2 replaced by its pool average ε(b) otherwise; for attention scores a proxy.

Allocation: minimise sum_p w_p ε(b_p) subject to sum_p bytes(b_p) <= B, #{p : b_p > 0} <= C and
b_p = 16 for protected p, over widths b in the allowed set plus 0. Exact, in these steps:
1. Protected tokens take 16 bits: B' = B - n_protected * bytes(16), C' = C - n_protected.
2. A width with no lower ε than a cheaper option (0 included) is dropped: never better.
3. Exchange: giving p and q (w_p >= w_q, b_p < b_q) each other's width keeps the bytes and changes the
   distortion by (w_p - w_q)(ε(b_q) - ε(b_p)) <= 0, so an optimum has widths non-increasing along the
   tokens sorted by w (ties by index): only the C' best positive-weight tokens need bytes, and a
   solution is t_1 <= ... <= t_m, t_j = #{p : b_p >= b_j} (b_1 > ... > b_m the widths), with
   bytes sum_j (c_j - c_{j+1}) t_j and distortion sum_j ε_j (W(t_j) - W(t_{j-1})) + W(N) - W(t_m),
   W the prefix sums of sorted w, c_j = bytes(b_j), c_{m+1} = 0, t_0 = 0.
4. Lagrangian (reverse water-filling): take the steps between consecutive points of each token's
   lower convex hull of (bytes, distortion) in decreasing order of gain per byte w Δε / Δc, stopping
   at the first that does not fit: z minimises w_p ε(b) + λ* bytes(b) for every p (λ* the gain per
   byte of that step) and leaves fewer than c_1 bytes (or takes every step: then z is optimal).
5. Proximity (among step 3's C' tokens, where the cap no longer binds): take x* optimal with the
   fewest tokens differing from z. Their byte changes
   δ_p ∈ [-c_1, c_1], multiples of u = gcd(c_j), sum into (-c_1, c_1) (z leaves < c_1 bytes; c_1 unused
   by x* would pay for moving a token up to its z width). Ordered to keep every partial sum in
   (-c_1, c_1] (Steinitz: a positive one while the sum is <= 0, else a negative one), more than
   2 c_1 / u - 1 of them would repeat a partial sum, and the tokens between, moved back to z, keep
   the bytes without raising the distortion (z is λ*-optimal per token): a contradiction.
   Sorting x* by w keeps every t_j, so an optimum has |t_j - t_j(z)| <= R = 2 c_1 / u - 1.
6. Search that box over t_1..t_{m-1}, t_m the largest that fits: cost O(N log N + (2R + 1)^(m-1)).
   Widths 16/8/4/2 at head_dim 64: R = 31 with groups of 32 (2.5e5 candidates, ~2-15 ms on one CPU
   thread), R = 63 with groups of 64 (2e6, ~25-60 ms); the fill is ~15 ms at N = 30000.
The result is an optimum (up to float64 rounding of the objective); ties go to fewer bytes, then
the lexicographically smallest (t_1, ..., t_m), then, within equal weights, to earlier tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from obcache.quantization import SCALE_DTYPE, quantize

#: Allowed widths in bits: 0 = evicted, 16 = 16-bit float, 2/4/8 = quantized.
WIDTHS = (0, 2, 4, 8, 16)
_CHUNK = 1 << 18  # candidate count vectors evaluated at once


def check_widths(widths: Iterable[int]) -> tuple[int, ...]:
    """Return the distinct widths, largest first, if all are in WIDTHS, else raise ValueError."""
    widths = tuple(widths)
    bad = [b for b in widths if isinstance(b, bool) or b not in WIDTHS]
    if bad:
        raise ValueError(f"widths must be in {{{', '.join(map(str, WIDTHS))}}} (0 = evicted), got {bad}")
    return tuple(sorted(set(widths), reverse=True))


def bytes_per_token(width: int, head_dim: int, group_size: int) -> int:
    """Bytes one token's row of head_dim elements holds at `width`: 0 evicted, 2 * head_dim at 16,
    else head_dim * width / 8 of codes + 2 x 2 bytes (scale, zero) per group, head_dim / group_size
    groups per token (head-dim groups) or head_dim groups per group_size tokens (token groups)."""
    check_widths([width])
    for name, value in (("head_dim", head_dim), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if width in (0, 16):
        return width * head_dim // 8
    side = 2 * SCALE_DTYPE.itemsize * head_dim
    if head_dim * width % 8 or side % group_size:
        raise ValueError(f"head_dim {head_dim} and group_size {group_size} give no whole number of bytes per token")
    return head_dim * width // 8 + side // group_size


def measured_error(x: torch.Tensor, width: int, group_size: int, axis: int = -1,
                   full_dtype: torch.dtype = SCALE_DTYPE) -> float:
    """ε(width) = sum (x - x^)^2 / sum x^2 for x stored at `width`: 0 evicted (1); 16 as is if x is
    16-bit, else cast to `full_dtype` and back; 2/4/8 `quantize(x, width, group_size, axis)` and back."""
    (width,) = check_widths([width])
    if width == 0:
        return 1.0
    if width == 16:
        stored = x if x.dtype.itemsize == 2 else x.to(full_dtype).to(x.dtype)
    else:
        stored = quantize(x, width, group_size, axis).dequantize()
    energy = x.double().square().sum()
    if energy == 0:
        raise ValueError("x is all zero: its relative error is undefined")
    return float((x.double() - stored.double()).square().sum() / energy)


def logit_noise(queries: torch.Tensor, keys: torch.Tensor, width: int, group_size: int, scaling: float) -> float:
    """sqrt(mean_{i,p} (s q_i.(k^_p - k_p))^2): the root-mean-square error in nats that storing `keys` [n, d] at
    `width` (the quantizer of `measured_error`) puts on the attention logits of `queries` [m, d].

    The distortion model linearises the softmax in the logit error (key bullet above), which holds while
    that error is well under a nat. A model with a few huge key channels (Qwen2.5's first layers: logits of
    rms 40-450) meets ε(4) ~ 0.2% relative yet logit errors of 1-22 nats, where the linearisation, and the
    price it gives, fail (MixedPrecision then treats the width as no better than eviction)."""
    (width,) = check_widths([width])
    if width in (0, 16):
        raise ValueError("logit_noise measures a quantized width (2, 4 or 8)")
    stored = quantize(keys, width, group_size).dequantize()
    error = scaling * queries.double() @ (stored.double() - keys.double()).T  # [m, n]
    return float(error.square().mean().sqrt())


def allocate_widths(
    weights: torch.Tensor,
    byte_budget: int,
    errors: Mapping[int, float],
    token_bytes: Mapping[int, int],
    *,
    cap: int | None = None,
    protected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Width per token, long [N], minimising sum_p weights_p errors[b_p] (module docstring).

    weights: [N] >= 0, the policy's scores of one pool (e.g. a layer's (row, KV head, token)s).
    byte_budget: bytes for the whole pool, protected tokens included; never exceeded.
    errors: ε(b) for each allowed nonzero width b; 0 (evicted, ε = 1, 0 bytes) is always allowed.
    token_bytes: bytes of one token at each width of `errors`, and at 16 if any token is protected.
    cap: at most this many tokens at a nonzero width, protected included (default: no cap).
    protected: bool [N], tokens kept at 16 bits whatever their weight.
    """
    n_protected = _check_allocation(weights, byte_budget, errors, token_bytes, cap, protected)
    widths = torch.zeros(weights.shape, dtype=torch.long, device=weights.device)
    free = torch.arange(weights.numel(), device=weights.device)
    budget = byte_budget
    if n_protected:
        widths[protected] = 16
        free = free[~protected]
        budget -= n_protected * token_bytes[16]
    levels = _undominated(errors, token_bytes)  # (width, ε, bytes), bytes descending
    w = weights[free].double()
    order = torch.sort(w, descending=True, stable=True).indices
    sorted_w = w[order]
    slots = min(int((sorted_w > 0).sum()), (weights.numel() if cap is None else cap) - n_protected)
    if not levels or slots == 0:
        return widths
    prefix = torch.cat([sorted_w.new_zeros(1), sorted_w.cumsum(0)])  # W(t)
    start = _water_fill(sorted_w[:slots], levels, budget)
    counts = _search(prefix, start, levels, budget, slots)  # t_1 <= ... <= t_m
    level = torch.searchsorted(counts, torch.arange(slots, device=weights.device), right=True)
    table = torch.tensor([b for b, _, _ in levels] + [0], device=weights.device)
    widths[free[order[:slots]]] = table[level]
    return widths


def _undominated(errors: Mapping[int, float], token_bytes: Mapping[int, int]) -> list[tuple[int, float, int]]:
    """(width, ε, bytes) of the widths with lower ε than every cheaper option, bytes descending."""
    kept, best = [], 1.0  # eviction: ε = 1 at 0 bytes
    for width in sorted(errors, key=lambda b: (token_bytes[b], errors[b])):
        if errors[width] < best:
            kept.append((width, float(errors[width]), int(token_bytes[width])))
            best = errors[width]
    return kept[::-1]


def _water_fill(weights: torch.Tensor, levels: list[tuple[int, float, int]], budget: int) -> list[int]:
    """Counts t_j(z) of the Lagrangian fill z (step 4) over sorted positive weights."""
    hull = [(0, 1.0)]  # lower convex hull of (bytes, ε), bytes ascending, strict vertices only
    for _, error, size in reversed(levels):
        while len(hull) > 1 and ((hull[-1][0] - hull[-2][0]) * (error - hull[-2][1])
                                 - (hull[-1][1] - hull[-2][1]) * (size - hull[-2][0])) <= 0:
            hull.pop()
        hull.append((size, error))
    steps = len(hull) - 1
    sizes = torch.tensor([hull[h + 1][0] - hull[h][0] for h in range(steps)], device=weights.device)
    slopes = torch.tensor([(hull[h][1] - hull[h + 1][1]) / (hull[h + 1][0] - hull[h][0]) for h in range(steps)],
                          dtype=torch.float64, device=weights.device)
    gains = (weights[:, None] * slopes).flatten()  # (token, step), token-major: ties go to the earlier
    ranked = torch.sort(gains, descending=True, stable=True).indices
    taken = int((sizes[ranked % steps].cumsum(0) <= budget).sum())
    reached = torch.bincount(ranked[:taken] % steps, minlength=steps).tolist()  # tokens past each step
    return [reached[next(h for h in range(steps) if hull[h + 1][0] >= size)] for _, _, size in levels]


def _search(prefix: torch.Tensor, start: list[int], levels: list[tuple[int, float, int]], budget: int,
            slots: int) -> torch.Tensor:
    """The best counts, long [m]: t_1..t_{m-1} within R of `start`, t_m the largest that fits (step 6).

    Distortion up to a constant: sum_j (ε_j - ε_{j+1}) W(t_j), ε_{m+1} = 1; each free count
    runs along its own dim, so only the last count and the sums are computed per candidate.
    """
    device = prefix.device
    sizes = [size for _, _, size in levels]
    errors = [error for _, error, _ in levels] + [1.0]
    steps = [size - smaller for size, smaller in zip(sizes, sizes[1:] + [0])]  # c_j - c_{j+1}
    radius = 2 * sizes[0] // math.gcd(*sizes) - 1
    ranges = [torch.arange(max(0, s - radius), min(slots, s + radius) + 1, device=device) for s in start[:-1]]
    inner = math.prod(len(values) for values in ranges[1:])
    best = (math.inf, 0, None)
    for block in ranges[0].split(max(1, _CHUNK // inner)) if ranges else [None]:
        grid = [block, *ranges[1:]] if ranges else []
        axes = [values.view([-1] + [1] * (len(grid) - 1 - j)) for j, values in enumerate(grid)]
        spent = sum((steps[j] * t for j, t in enumerate(axes)), torch.zeros((), dtype=torch.long, device=device))
        last = torch.clamp((budget - spent).div(steps[-1], rounding_mode="floor"), max=slots)
        feasible = last >= (axes[-1] if axes else 0)
        for lower, upper in zip(axes, axes[1:]):
            feasible = feasible & (lower <= upper)
        value = sum(((errors[j] - errors[j + 1]) * prefix[t] for j, t in enumerate(axes)), 0.0)
        value = value + (errors[-2] - 1.0) * prefix[last.clamp(min=0)]
        shape = [len(values) for values in grid]
        value = torch.broadcast_to(value.masked_fill(~feasible, math.inf), shape).flatten()
        used = torch.broadcast_to(spent + steps[-1] * last, shape).flatten()
        least = value.min()
        if not torch.isfinite(least):
            continue
        pick = int(torch.argmin(torch.where(value == least, used, used.max() + 1)))
        if (float(least), int(used[pick])) < best[:2]:
            index = torch.unravel_index(torch.tensor(pick), shape) if shape else ()
            last_pick = torch.broadcast_to(last, shape).flatten()[pick]
            best = (float(least), int(used[pick]), torch.stack([*(g[i] for g, i in zip(grid, index)), last_pick]))
    return best[2]


def _check_allocation(weights, byte_budget, errors, token_bytes, cap, protected) -> int:
    """Validate allocate_widths' arguments before any work; return the protected count."""
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or not weights.is_floating_point():
        raise ValueError("weights must be a 1-D floating-point tensor")
    if weights.numel() and not (torch.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError(f"weights must be finite and >= 0, got min {weights.min().item()}")
    if not isinstance(errors, Mapping) or not isinstance(token_bytes, Mapping):
        raise ValueError("errors and token_bytes must map widths to ε and to bytes per token")
    if 0 in errors:
        raise ValueError("leave 0 out of errors: eviction is always allowed, with ε(0) = 1 and 0 bytes")
    check_widths(errors)
    for width, error in errors.items():
        if not isinstance(error, (int, float)) or not math.isfinite(error) or error < 0:
            raise ValueError(f"errors[{width}] must be a finite number >= 0, got {error!r}")
    n_protected = 0
    if protected is not None:
        if not isinstance(protected, torch.Tensor) or protected.dtype != torch.bool or protected.shape != weights.shape:
            raise ValueError(f"protected must be a bool tensor of shape {tuple(weights.shape)}")
        n_protected = int(protected.sum())
    needed = set(errors) | ({16} if n_protected else set())
    for width in needed:
        size = token_bytes.get(width)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"token_bytes[{width}] must be a positive int, got {size!r}")
    if isinstance(byte_budget, bool) or not isinstance(byte_budget, int) or byte_budget < 0:
        raise ValueError(f"byte_budget must be an int >= 0, got {byte_budget!r}")
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < n_protected):
        raise ValueError(f"cap must be an int >= the {n_protected} protected tokens, got {cap!r}")
    if n_protected and n_protected * token_bytes[16] > byte_budget:
        raise ValueError(f"the {n_protected} protected tokens need {n_protected * token_bytes[16]} bytes at 16 bits "
                         f"({n_protected} x {token_bytes[16]}), more than the byte budget {byte_budget}")
    return n_protected
