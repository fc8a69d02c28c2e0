"""Per-token saliency scores for KV-cache eviction (OBCache, arXiv 2510.07651).

One layer at a time: given the post-RoPE queries of a window of W prompt
positions and the cached keys/values of L positions, score every cached token
of every KV head (higher = more important = keep). With, per query head,
z_ip = scaling * q_i.k_p (causal), A_ip = softmax_p(z_ip), o_i = sum_p A_ip v_p:

    attention      sum_i A_ip
    obc-value      sum_i A_ip^2 ||v_p||^2
    obc-key        sum_i A_ip^2 z_ip^2 ||v_p - o_i||^2
    obc-joint      sum_i A_ip^2 ||(1 + z_ip) v_p - z_ip o_i||^2
    exact-removal  sum_i A_ip^2 ||v_p - o_i||^2 / (1 - A_ip)^2   (extension, not OBCache)

The OBCache scores are the squared first-order change of the window's
attention outputs when the token's value row, key row or both are zeroed
(Optimal Brain Damage with the Gauss-Newton Hessian); `exact-removal` is the
exact squared output change of deleting the token (softmax renormalised).
A KV head's score sums over the W queries and, with `gqa="sum"` (the paper),
over the G query heads sharing it. With `gqa="pre-average"` (the default of the
authors' second release) A, z and o are first averaged over the G query heads,
and the score is formed once from the averages:
A_ip -> mean_g A^g_ip, z_ip -> mean_g z^g_ip, o_i -> mean_g o^g_i.
Pure torch; costs O(G*W*L*d) per KV head and never builds an L x L matrix
(unless W = L).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SCORE_KINDS: dict[str, str] = {
    "attention": "attention received, sum_i A_ip (the H2O / TOVA / SnapKV baseline)",
    "obc-value": "OBCache, value row pruned: sum_i A_ip^2 ||v_p||^2",
    "obc-key": "OBCache, key row pruned: sum_i A_ip^2 z_ip^2 ||v_p - o_i||^2",
    "obc-joint": "OBCache, key and value rows pruned: sum_i A_ip^2 ||(1+z_ip) v_p - z_ip o_i||^2",
    "exact-removal": "extension (not OBCache): exact output change of deleting the token, "
    "sum_i A_ip^2 ||v_p - o_i||^2 / (1-A_ip)^2",
}

QUERY_REDUCTIONS: dict[str, str] = {
    "sum": "sum over the window's queries (and, with gqa='sum', the G query heads)",
    "max": "max over the window's queries and the G query heads (KVzip's aggregation)",
}

GQA_REDUCTIONS: dict[str, str] = {
    "sum": "sum the scores of the G query heads that share a KV head (the paper)",
    "pre-average": "average A, z and o over the G query heads first, then score once (authors' v2 default)",
}

#: Lower clamp of 1 - A_ip in the `exact-removal` score.
EXACT_REMOVAL_EPS = 1e-6


def check_score_kind(kind: str) -> str:
    """Return `kind` if it names a score in SCORE_KINDS, else raise ValueError listing them."""
    if not isinstance(kind, str) or kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}; allowed kinds: {', '.join(SCORE_KINDS)}")
    return kind


def check_reduce(reduce: str) -> str:
    """Return `reduce` if it names a reduction over queries in QUERY_REDUCTIONS, else raise ValueError."""
    if not isinstance(reduce, str) or reduce not in QUERY_REDUCTIONS:
        raise ValueError(f"unknown aggregation over queries {reduce!r}; allowed: {', '.join(QUERY_REDUCTIONS)}")
    return reduce


def check_gqa(gqa: str) -> str:
    """Return `gqa` if it names a reduction in GQA_REDUCTIONS, else raise ValueError listing them."""
    if not isinstance(gqa, str) or gqa not in GQA_REDUCTIONS:
        raise ValueError(f"unknown gqa reduction {gqa!r}; allowed: {', '.join(GQA_REDUCTIONS)}")
    return gqa


def saliency(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    kind: str,
    *,
    scaling: float,
    query_positions: torch.Tensor | Sequence[int] | None = None,
    key_mask: torch.Tensor | None = None,
    outputs: torch.Tensor | None = None,
    gqa: str = "sum",
    reduce: str = "sum",
    log_normalizers: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score each cached token of each KV head; float32 [B, Hkv, L] (float64 for float64 queries).

    queries: [B, Hq, W, d] post-RoPE window queries; query head h uses KV head
        h // G with G = Hq // Hkv (transformers' repeat_kv layout).
    keys: [B, Hkv, L, d] post-RoPE; values: [B, Hkv, L, dv].
    kind: a key of SCORE_KINDS (formulas in the module docstring).
    scaling: the attention module's logit scale, z = scaling * q.k.
    query_positions: [W] integer positions in [0, L); query j sees keys p <= its
        position. Default: the last W positions (L - W + j).
    key_mask: [B, L] (or per KV head [B, Hkv, L]) bool (or 0/1 integer); False marks
        padding keys, never attended.
    outputs: [B, Hq, W, dv], optional: the window queries' attention outputs
        o_i = sum_p A_ip v_p as the model computed them (e.g. captured at the
        input of its output projection). Saves one W x L product for `obc-key`,
        `obc-joint` and `exact-removal`; they are recomputed when None. Rows of
        queries that see no key are ignored.
    gqa: how the G query heads of a KV head combine (GQA_REDUCTIONS): "sum" of
        their scores, or "pre-average" of A, z and o before scoring.
    reduce: "sum" over the queries (the formulas above), or "max": the largest
        single-query term over the W queries and the G query heads (after
        pre-averaging, if any), as KVzip aggregates its reconstruction queries.
    log_normalizers: [B, Hq, W], optional: lse_i = log sum_p exp(z_ip) over every
        key query i sees, of which `keys` may be only a part (KVzip scores the
        context, while its queries also see their own tokens). Then
        A_ip = exp(z_ip - lse_i) instead of the softmax over `keys`, and `outputs`
        should be the queries' true outputs (over all their keys).

    Computed in float32 whatever the input dtype (float64 inputs: in float64). Returns, per KV head, the sum
    over the W queries and its G query heads. Keys that no window query can see
    score exactly 0. For `exact-removal`, 1 - A_ip is clamped at EXACT_REMOVAL_EPS,
    a query's only visible key contributes ||v_p||^2 / EXACT_REMOVAL_EPS^2 (deleting
    it empties the softmax), and precision degrades as A_ip -> 1 (float32 error
    ~1e-7 ||v_p||^2 / (1 - A_ip)^2 from expanding ||v_p - o_i||^2).
    """
    check_score_kind(kind)
    check_gqa(gqa)
    check_reduce(reduce)
    batch, heads_kv, group, width, length = _check_shapes(queries, keys, values)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    device = keys.device
    positions, first, last = _check_positions(query_positions, width, length, device)
    key_mask = _check_key_mask(key_mask, batch, length, device)
    if key_mask is not None and key_mask.shape[1] not in (1, heads_kv):
        raise ValueError(f"a per-head key_mask must have {heads_kv} heads (the keys'), got {key_mask.shape[1]}")
    if outputs is not None:
        _check_outputs(outputs, queries, values)
    if log_normalizers is not None and tuple(log_normalizers.shape) != tuple(queries.shape[:3]):
        raise ValueError(f"log_normalizers must be [B, Hq, W] = {tuple(queries.shape[:3])}, "
                         f"got {tuple(log_normalizers.shape)}")

    # Keys < lo are visible to every query, keys >= hi to none: mask only [lo, hi).
    lo, hi = first + 1, last + 1
    if key_mask is not None:
        if bool(key_mask[..., :hi].all()):
            key_mask = None
        else:
            lo = 0
    columns = torch.arange(lo, hi, device=device)
    visible = (columns[None, :] <= positions[:, None])[None, None]  # [1, 1, W, hi - lo]
    if key_mask is not None:
        visible = visible & key_mask[:, :, None, lo:hi]  # [B, 1 or Hkv, W, hi - lo]
    hidden = ~visible[:, :, None]  # broadcasts over [B, Hkv, G, W, hi - lo]

    rows = group * width
    f32 = torch.float64 if queries.dtype == torch.float64 else torch.float32  # float32 unless given float64
    q = queries.to(f32).reshape(batch, heads_kv, rows, -1) * scaling  # [B, Hkv, G*W, d]
    k = keys[:, :, :hi].to(f32)  # [B, Hkv, hi, d]
    v = values[:, :, :hi].to(f32)  # [B, Hkv, hi, dv]

    z = torch.matmul(q, k.transpose(-1, -2))  # [B, Hkv, G*W, hi] logits
    z_masked = z.view(batch, heads_kv, group, width, hi)[..., lo:hi]
    z_masked.masked_fill_(hidden, float("-inf"))
    if log_normalizers is None:
        weights = torch.softmax(z, dim=-1)  # A
    else:
        normalizers = log_normalizers.to(f32).reshape(batch, heads_kv, rows, 1)
        weights = (z.sub_(normalizers) if kind == "attention" else z - normalizers).exp_()  # A; attention needs no z
    empty = None
    if key_mask is not None:
        empty = ~visible.any(-1)  # [B, 1 or Hkv, W]: queries that see no key at all (NaN rows)
        if bool(empty.any()):
            weights.view(batch, heads_kv, group, width, hi).masked_fill_(empty[:, :, None, :, None], 0.0)
        else:
            empty = None

    if gqa == "pre-average" and group > 1:
        # Average A, z (0 where hidden) and o over the group; from here on the group is one head.
        z_masked.masked_fill_(hidden, 0.0)
        weights = weights.view(batch, heads_kv, group, width, hi).mean(2)
        z = z.view(batch, heads_kv, group, width, hi).mean(2)
        if outputs is not None:
            outputs = outputs.to(f32).view(batch, heads_kv, group, width, -1).mean(2)
        group, rows = 1, width
        z_masked = z.view(batch, heads_kv, 1, width, hi)[..., lo:hi]

    if kind == "attention":
        return _pad(_reduce_rows(weights, reduce), length)

    value_norms = torch.linalg.vector_norm(v, dim=-1).square_()  # [B, Hkv, hi] ||v_p||^2
    if kind == "obc-value":
        return _pad(_reduce_rows(weights.square_(), reduce).mul_(value_norms), length)

    if outputs is None:
        outputs = torch.matmul(weights, v)  # [B, Hkv, G*W, dv] o_i
    else:
        outputs = outputs.to(f32).reshape(batch, heads_kv, rows, -1)  # a copy only if not float32
        if empty is not None:  # the model's output for a query that sees nothing is arbitrary
            outputs = outputs.view(batch, heads_kv, group, width, -1).masked_fill(empty[:, :, None, :, None], 0.0)
            outputs = outputs.view(batch, heads_kv, rows, -1)
    output_norms = outputs.square().sum(-1)  # [B, Hkv, G*W] ||o_i||^2
    if kind == "exact-removal":
        del z, z_masked
        denominator = torch.rsub(weights, 1.0).clamp_min_(EXACT_REMOVAL_EPS)
        y = weights.div_(denominator)  # A / (1 - A)
        del denominator
    else:
        z_masked.masked_fill_(hidden, 0.0)
        y = z.mul_(weights)  # A z
    inner = torch.matmul(outputs * -2.0, v.transpose(-1, -2))  # [B, Hkv, G*W, hi] -2 <o_i, v_p>

    if kind == "obc-joint":
        # A^2 ||(1+z) v - z o||^2 = a^2 ||v||^2 - 2 a y <o, v> + y^2 ||o||^2 with a = A (1 + z), y = A z
        a = weights.add_(y)
        inner.mul_(y).addcmul_(a, value_norms.unsqueeze(-2)).mul_(a)
        if reduce == "max":
            scores = _reduce_rows(inner.addcmul_(y.square_(), output_norms.unsqueeze(-1)), reduce)
        else:
            scores = _sum_rows(inner).add_(_sum_rows(y.square_(), output_norms))
    else:
        # c^2 ||v - o||^2 = c^2 (||v||^2 - 2 <o, v> + ||o||^2) with c = A z (obc-key) or A / (1 - A)
        c2 = y.square_()
        if reduce == "max":
            inner.add_(output_norms.unsqueeze(-1)).add_(value_norms.unsqueeze(-2))
            scores = _reduce_rows(inner.mul_(c2), reduce)
        else:
            sums = torch.matmul(torch.stack([torch.ones_like(output_norms), output_norms], dim=-2), c2)
            scores = _sum_rows(inner.mul_(c2)).add_(sums[..., 1, :]).addcmul_(sums[..., 0, :], value_norms)
        if kind == "exact-removal":
            _add_sole_key_scores(scores, value_norms, positions, key_mask, group, reduce)
    return _pad(scores.clamp_min_(0.0), length)


def _reduce_rows(x: torch.Tensor, reduce: str) -> torch.Tensor:
    """Sum or max over the rows (queries x query heads) of x [..., R, n] -> [..., n]."""
    return _sum_rows(x) if reduce == "sum" else x.amax(-2)


def _sum_rows(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i w_i x_ip over the rows of x [..., R, n] -> [..., n] (w [..., R], default 1), as a matmul."""
    if weights is None:
        weights = x.new_ones(x.shape[-2])
    return torch.matmul(weights.unsqueeze(-2), x).squeeze(-2)


def _pad(scores: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-extend [B, Hkv, hi] scores to [B, Hkv, L] (keys after every query)."""
    if scores.shape[-1] == length:
        return scores
    out = scores.new_zeros(*scores.shape[:-1], length)
    out[..., : scores.shape[-1]] = scores
    return out


def _add_sole_key_scores(
    scores: torch.Tensor,
    value_norms: torch.Tensor,
    positions: torch.Tensor,
    key_mask: torch.Tensor | None,
    group: int,
    reduce: str = "sum",
) -> None:
    """exact-removal: add ||v_p||^2 / eps^2 per query head whose only visible key is p (in place);
    with reduce="max", raise the score to ||v_p||^2 / eps^2 if any query head has p as its only key.

    scores, value_norms: [B, Hkv, hi]; positions: [W]; key_mask: [B, 1 or Hkv, L] or None.
    """
    batch, heads = scores.shape[:2]
    if key_mask is None:
        count = (positions == 0).sum().to(scores.dtype).expand(batch, heads)  # [B, Hkv]
        first = torch.zeros(batch, heads, dtype=torch.long, device=scores.device)
    else:
        seen = key_mask.to(torch.int32).cumsum(-1)[..., positions]  # [B, 1 or Hkv, W] visible keys per query
        count = (seen == 1).sum(-1).to(scores.dtype).expand(batch, heads)
        first = key_mask.to(torch.int32).argmax(-1).expand(batch, heads)  # the only visible key of those queries
    index = first.unsqueeze(-1)
    if reduce == "max":
        extra = value_norms.gather(-1, index) * ((count > 0).to(scores.dtype) / EXACT_REMOVAL_EPS**2).unsqueeze(-1)
        scores.scatter_reduce_(-1, index, extra, reduce="amax")
        return
    extra = value_norms.gather(-1, index) * (count * group / EXACT_REMOVAL_EPS**2).unsqueeze(-1)
    scores.scatter_add_(-1, index, extra)


def _check_shapes(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate shapes and dtypes; return (B, Hkv, G, W, L)."""
    for name, tensor in (("queries", queries), ("keys", keys), ("values", values)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    batch, heads_q, width, dim = queries.shape
    _, heads_kv, length, key_dim = keys.shape
    if keys.shape[0] != batch or values.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: queries {batch}, keys {keys.shape[0]}, values {values.shape[0]}"
        )
    if values.shape[:3] != keys.shape[:3]:
        raise ValueError(
            f"values {tuple(values.shape)} must match keys {tuple(keys.shape)} in batch, heads and length"
        )
    if key_dim != dim:
        raise ValueError(f"head_dim mismatch: queries have {dim}, keys have {key_dim}")
    if heads_kv == 0 or heads_q % heads_kv != 0 or heads_q == 0:
        raise ValueError(f"query heads ({heads_q}) must be a positive multiple of KV heads ({heads_kv})")
    if width == 0:
        raise ValueError("the query window is empty (W = 0)")
    return batch, heads_kv, heads_q // heads_kv, width, length


def _check_outputs(outputs: torch.Tensor, queries: torch.Tensor, values: torch.Tensor) -> None:
    """Validate captured attention outputs [B, Hq, W, dv]."""
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"outputs must be a torch.Tensor, got {type(outputs).__name__}")
    expected = (*queries.shape[:3], values.shape[-1])
    if tuple(outputs.shape) != expected:
        raise ValueError(f"outputs must have shape {expected} [batch, query heads, window, value dim], got {tuple(outputs.shape)}")
    if not outputs.is_floating_point():
        raise ValueError(f"outputs must be a floating-point tensor, got {outputs.dtype}")


def _check_positions(
    query_positions: torch.Tensor | Sequence[int] | None, width: int, length: int, device: torch.device
) -> tuple[torch.Tensor, int, int]:
    """Validate query positions (None: the last W, needs W <= L); return ([W] long, min, max)."""
    if query_positions is None:
        if width > length:
            raise ValueError(f"window of {width} queries is longer than the {length} cached keys")
        return torch.arange(length - width, length, device=device), length - width, length - 1
    positions = torch.as_tensor(query_positions, device=device)
    if positions.dtype == torch.bool or positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"query_positions must be integers, got {positions.dtype}")
    if positions.shape != (width,):
        raise ValueError(f"query_positions must have shape ({width},), got {tuple(positions.shape)}")
    positions = positions.long()
    low, high = torch.stack([positions.min(), positions.max()]).tolist()
    if low < 0 or high >= length:
        raise ValueError(f"query_positions must lie in [0, {length - 1}], got range [{low}, {high}]")
    return positions, low, high


def _check_key_mask(
    key_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor | None:
    """Validate a [B, L] or per-head [B, Hkv, L] keep mask (bool or 0/1 integers); return it as bool [B, 1 or Hkv, L]."""
    if key_mask is None:
        return None
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask must be a torch.Tensor, got {type(key_mask).__name__}")
    if key_mask.dim() not in (2, 3) or key_mask.shape[0] != batch or key_mask.shape[-1] != length:
        raise ValueError(f"key_mask must have shape ({batch}, {length}) or ({batch}, Hkv, {length}), "
                         f"got {tuple(key_mask.shape)}")
    if key_mask.is_floating_point() or key_mask.is_complex():
        raise ValueError(f"key_mask must be bool (True = real token), got {key_mask.dtype}")
    key_mask = key_mask.to(device=device, dtype=torch.bool)
    return key_mask.unsqueeze(1) if key_mask.dim() == 2 else key_mask
