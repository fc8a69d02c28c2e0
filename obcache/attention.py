"""Attention over an `EvictableCache`, registered as transformers attention functions.

While a model is attached (`policy.attach(model)` / `obcache.attach(model)`)
its attention implementation is `obcache-sdpa` or `obcache-eager`, which wrap
the model's own one. The hooks pass the forward's `ForwardRecord` in as the
`obcache_forward` keyword; the function then builds the mask from the cache's slot positions
(slot p is seen by query i iff it holds a real token at or before i's
position), so eviction, padding and continuation never need a mask of the
logical length:

- uniform layers: the model's own sdpa or eager kernel, with that mask;
- ragged layers: per (row, head) segment on the CPU, and one fused
  variable-length flash kernel (`torch.nn.attention.varlen`) on CUDA when
  every segment decodes one token in half precision.

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

from obcache.layouts import RaggedLayer

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
    if isinstance(layer, RaggedLayer):
        return ragged_attention(query, layer, positions, scaling), None
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


def ragged_attention(query: torch.Tensor, layer: RaggedLayer, positions: torch.Tensor, scaling: float) -> torch.Tensor:
    """softmax(s q k^T) v per (row, KV head) segment; query [B, Hq, q, d] -> [B, q, Hq, d]."""
    batch, query_heads, length, dim = query.shape
    group = query_heads // layer.heads
    if query.is_cuda and length == 1 and not layer.padded and query.dtype in (torch.float16, torch.bfloat16):
        return _varlen_decode(query, layer, scaling)
    out = query.new_empty(batch, query_heads, length, layer.values.shape[-1])
    for row, head, keys, values, slots in layer.segments():
        heads = slice(head * group, (head + 1) * group)
        rows = query[row, heads].reshape(1, 1, group * length, dim)  # the group's queries share the keys
        mask = None
        if length > 1 or layer.padded:
            mask = ((slots[None, :] <= positions[:, None]) & (slots >= 0)).repeat(group, 1)  # [G*q, n]
        o = F.scaled_dot_product_attention(rows, keys[None, None], values[None, None], attn_mask=mask, scale=scaling)
        out[row, heads] = o.view(group, length, -1)
    return out.transpose(1, 2).contiguous()


def _varlen_decode(query: torch.Tensor, layer: RaggedLayer, scaling: float) -> torch.Tensor:
    """One decoding step over all segments in one fused flash kernel (CUDA, fp16/bf16)."""
    from torch.nn.attention.varlen import varlen_attn

    batch, query_heads, _, dim = query.shape
    group = query_heads // layer.heads
    segments = batch * layer.heads
    rows = query.view(batch, layer.heads, group, dim).reshape(segments, group, dim)  # one sequence per segment
    cu_q = torch.arange(segments + 1, device=query.device, dtype=torch.int32)
    cu_k = torch.tensor(layer.offsets, device=query.device, dtype=torch.int32)
    out = varlen_attn(
        rows.contiguous(), layer.keys[:, None], layer.values[:, None], cu_q, cu_k, 1, max(layer.lengths),
        scale=scaling, enable_gqa=True,
    )  # [segments, G, dv]
    return out.reshape(batch, 1, query_heads, -1)
