"""Attention over an `EvictableCache`, registered as transformers attention functions.

While a model is attached (`policy.attach(model)` / `obcache.attach(model)`)
its attention implementation is `obcache-sdpa` or `obcache-eager`, which wrap
the model's own one. The hooks pass the forward's `ForwardRecord` in as the
`obcache_forward` keyword; the function then builds the mask from the cache's slot positions
(slot p is seen by query i iff it holds a real token at or before i's
position), so eviction, padding and continuation never need a mask of the
logical length:

- uniform layers: the model's own sdpa or eager kernel, with that mask;
- paged layers (heads of unequal length): one batched computation over every
  block of the pool for a decoding step (the same torch code on the CPU and on
  CUDA, any dtype), and one masked SDPA over the layer's grid when a forward
  brings several tokens. Never a loop over segments.

Without a record (a forward without a cache) the wrapped kernel runs with
the mask transformers built, as usual. The function records the post-RoPE
queries in the record and, when it asks (KVzip's reconstruction forwards),
each query's log softmax denominator, from the CPU flash kernel behind sdpa.
"""

from __future__ import annotations

import sys
from functools import partial

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from obcache.kernels import paged_decode
from obcache.layouts import Blocks

IMPLEMENTATIONS = {"sdpa": "obcache-sdpa", "eager": "obcache-eager"}


def register() -> None:
    """Register `obcache-sdpa` and `obcache-eager` (idempotent; called when hooks attach)."""
    for base, name in IMPLEMENTATIONS.items():
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, partial(cache_attention, base=base))
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask if base == "sdpa" else eager_mask)


def cache_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, base: str, obcache_forward=None,
    **kwargs,
):
    """Attention of `query` [B, Hq, q, d] over the layer's slots; returns ([B, q, Hq, d], None)."""
    kernel = sdpa_attention_forward if base == "sdpa" else sys.modules[type(module).__module__].eager_attention_forward
    record = obcache_forward
    if record is None:
        return kernel(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    record.queries[module.layer_idx] = query  # for the observers: no need to rebuild them
    layer = record.cache.layers[module.layer_idx]
    positions = record.positions.to(query.device)
    if not layer.uniform:
        return paged_attention(query, layer, positions, scaling), None
    mask = layer.attention_mask(positions, causal_skip=base == "sdpa")
    if record.want_log_normalizers and base == "sdpa" and query.device.type == "cpu" and _cpu_flash():
        out, normalizers = _flash_with_log_normalizers(module, query, key, value, mask, scaling)
        record.log_normalizers[module.layer_idx] = normalizers
        return out, None
    if mask is not None and base == "eager":
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, torch.finfo(query.dtype).min)
    return kernel(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


def _flash_with_log_normalizers(module, query, key, value, mask, scaling):
    """sdpa's CPU flash kernel, which also returns each query's log softmax denominator [B, Hq, q].

    When the queries see every earlier slot and their own tokens causally (a reconstruction forward), the
    two parts run unmasked and causal, and are merged by their denominators: no mask to build or apply."""
    flash = _cpu_flash()
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)  # repeat_kv's layout
    length, earlier = query.shape[2], key.shape[2] - query.shape[2]
    if mask is not None and earlier > 0 and _sees_earlier_then_causal(mask, earlier):
        before, lse_before = flash(query, key[:, :, :earlier], value[:, :, :earlier], 0.0, False, scale=scaling)
        own, lse_own = flash(query, key[:, :, earlier:], value[:, :, earlier:], 0.0, True, scale=scaling)
        normalizers = torch.logaddexp(lse_before, lse_own)
        out = before.mul_((lse_before - normalizers).exp_().unsqueeze(-1))
        out.addcmul_(own, (lse_own - normalizers).exp_().unsqueeze(-1))
        return out.transpose(1, 2).contiguous(), normalizers
    causal = mask is None and length > 1 and getattr(module, "is_causal", True)
    if mask is not None:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, float("-inf"))
    out, normalizers = flash(query, key, value, 0.0, causal, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), normalizers


def _cpu_flash():
    """The CPU flash kernel behind sdpa that also returns the log-normalizers (a private op: None if gone)."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


def _sees_earlier_then_causal(mask: torch.Tensor, earlier: int) -> bool:
    """Whether bool `mask` [B, 1, q, earlier + q] shows every query all `earlier` slots and its own tokens causally."""
    length = mask.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril_()
    return bool(mask[..., :earlier].all()) and bool((mask[..., earlier:] == causal).all())


def paged_attention(query: torch.Tensor, layer, positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(s q k^T) v of every segment over its own slots, in one batched computation; [B, Hq, q, d] ->
    [B, q, Hq, d]. One new token per row (decoding): `decode_blocks` over the layer's block sets; several: one
    masked SDPA over the layer's grid."""
    if query.shape[2] == 1:
        sets = layer.block_sets(query.dtype)
        fused = paged_decode(query, sets, layer.heads, scaling)  # the CPU's fused kernel, where it applies
        return decode_blocks(query, sets, layer.heads, scaling) if fused is None else fused
    batch, query_heads, length, dim = query.shape
    group = query_heads // layer.heads
    grid = layer.grid()
    seen = (grid.positions[:, :, None, :] <= positions[None, None, :, None]) & grid.valid[:, :, None, :]  # [B, Hkv, q, W]
    rows = query.reshape(batch, layer.heads, group * length, dim)  # the G query heads of a KV head share its slots
    mask = seen.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(rows, grid.keys, grid.values, attn_mask=mask, scale=scaling)
    return out.view(batch, query_heads, length, -1).transpose(1, 2).contiguous()


def decode_blocks(query: torch.Tensor, sets: list[Blocks], heads: int, scaling: float) -> torch.Tensor:
    """One decoding step over every block of a pool (of each of its `sets`, e.g. one per stored width) at once,
    no copy of keys or values: each block's scores from its segment's G queries (z = s q k^T, -inf on a slot
    whose position is -1: empty, planned or padding), the segment's max M over its blocks' maxima, then
    out = sum_b sum_p e^(z_bp - M) v_bp / sum_b sum_p e^(z_bp - M), the sums over a segment's blocks by
    index_add. A free block (routed to segment 0) or one taken ahead of appends adds e^-inf = 0.
    query [B, Hq, 1, d] -> [B, 1, Hq, dv]."""
    batch, query_heads, _, dim = query.shape
    segments, group = batch * heads, query_heads // heads
    rows = query.reshape(segments, group, dim)
    bias = [torch.where(s.positions >= 0, 0.0, float("-inf")).to(query.dtype) for s in sets]  # [N, block]
    scores = [torch.baddbmm(b[:, None, :], rows[s.route], s.keys.transpose(1, 2), alpha=scaling)
              for s, b in zip(sets, bias)]
    top = scores[0].new_full((segments, group), float("-inf"))  # [S, G]
    for s, z in zip(sets, scores):
        top.scatter_reduce_(0, s.route[:, None].expand(-1, group), z.amax(-1), "amax")
    total = scores[0].new_zeros(segments, group)
    out = scores[0].new_zeros(segments, group, sets[0].values.shape[-1])
    for s, z in zip(sets, scores):
        weights = z.sub_(top[s.route][..., None]).exp_()  # [N, G, block]
        total.index_add_(0, s.route, weights.sum(-1))
        out.index_add_(0, s.route, torch.bmm(weights, s.values))
    return out.div_(total[..., None]).view(batch, 1, query_heads, -1)
