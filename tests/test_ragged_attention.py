"""The CUDA decode path over a ragged layer, checked on the CPU.

The fused kernel (torch.nn.attention.varlen) only runs on CUDA; tests/test_cuda.py runs it there. Here the
call obcache makes is checked against the kernel's documented contract: a stand-in that implements the
documented semantics in plain float64 loops gives the per-segment softmax, and torch's own shape rules
(its fake-tensor implementation of the op) accept the arguments.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from obcache.attention import _varlen_decode
from obcache.layouts import RaggedLayer

BATCH, HEADS, GROUP, LENGTH, DIM = 2, 3, 3, 40, 16


def ragged_layer():
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(BATCH, HEADS, LENGTH, DIM, generator=generator)
    values = torch.randn(BATCH, HEADS, LENGTH, DIM, generator=generator)
    keep = torch.rand(BATCH, HEADS, LENGTH, generator=generator) < torch.tensor([0.2, 0.5, 0.9])[None, :, None]
    positions = torch.arange(LENGTH, dtype=torch.int32).expand(BATCH, HEADS, -1)
    layer = RaggedLayer.from_tensors(keys, values, positions, keep)
    return layer, keys, values, keep


def documented_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, enable_gqa=False,
                           **unused):
    """The kernel's docstring in loops: sequence i's queries attend to its keys; query head h reads KV head
    h // (Hq / Hkv); full (non-causal) attention; float64."""
    assert not unused, unused
    query_heads, kv_heads = query.shape[1], key.shape[1]
    assert enable_gqa or query_heads == kv_heads
    out = torch.empty(query.shape[0], query_heads, value.shape[-1], dtype=torch.float64)
    for i in range(len(cu_seq_q) - 1):
        qs, ks = slice(int(cu_seq_q[i]), int(cu_seq_q[i + 1])), slice(int(cu_seq_k[i]), int(cu_seq_k[i + 1]))
        assert qs.stop - qs.start <= max_q and ks.stop - ks.start <= max_k
        for h in range(query_heads):
            kv = h // (query_heads // kv_heads)
            logits = scale * query[qs, h].double() @ key[ks, kv].double().T
            out[qs, h] = logits.softmax(-1) @ value[ks, kv].double()
    return out.to(query.dtype)


def test_the_decode_call_feeds_each_segment_to_the_kernel_as_documented(monkeypatch):
    """Through a stand-in for the kernel: each (row, KV head) segment's group of queries over its kept keys."""
    monkeypatch.setattr("torch.nn.attention.varlen.varlen_attn", documented_varlen_attn)
    layer, keys, values, keep = ragged_layer()
    query = torch.randn(BATCH, HEADS * GROUP, 1, DIM, generator=torch.Generator().manual_seed(1))
    out = _varlen_decode(query, layer, 0.25)
    assert out.shape == (BATCH, 1, HEADS * GROUP, DIM)
    for b in range(BATCH):
        for h in range(HEADS):
            k, v = keys[b, h][keep[b, h]].double(), values[b, h][keep[b, h]].double()
            q = query[b, h * GROUP : (h + 1) * GROUP, 0].double()  # the group shares its KV head
            expected = (0.25 * q @ k.T).softmax(-1) @ v
            torch.testing.assert_close(out[b, 0, h * GROUP : (h + 1) * GROUP].double(), expected)


def test_the_real_kernel_accepts_the_call():
    """torch's own shape and dtype rules for the op (its fake implementation, which never runs the kernel)
    accept what obcache passes. (A CPU-only torch cannot even fake a view of a CUDA tensor: the device is CPU.)"""
    layer, *_ = ragged_layer()
    with FakeTensorMode():
        for name in ("keys", "values"):  # the same segments, as the GPU path holds them
            setattr(layer, name, torch.empty(getattr(layer, name).shape, dtype=torch.bfloat16))
        query = torch.empty(BATCH, HEADS * GROUP, 1, DIM, dtype=torch.bfloat16)
        out = _varlen_decode(query, layer, 0.25)
        assert out.shape == (BATCH, 1, HEADS * GROUP, DIM)
        assert out.dtype == torch.bfloat16
