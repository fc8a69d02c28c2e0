"""One forward of an attached model: what its attention calls and its layer observers share.

`attach` makes a `ForwardRecord` before the decoder runs; obcache's attention
function receives it (keyword `obcache_forward`), records into it the post-RoPE
queries (and, when asked, each query's log softmax denominator), and the
output projection's pre-hook records the per-head attention outputs. After
each attention layer the observers read them through a `LayerState`. The
record lives as long as the forward; the cache keeps only the slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from obcache.cache import EvictableCache


@dataclass
class ForwardRecord:
    """One forward on an `EvictableCache`.

    positions: [q] logical positions of the forward's tokens (padding included).
    prefill: whether this forward is the first on the cache (the one that evicts the prompt).
    input_ids: [B, q] the forward's token ids, if it was given ids.
    want_log_normalizers: whether the attention function should record log sum_p exp(z_ip) of each query.
    queries, outputs, log_normalizers: per layer index, [B, Hq, q, d] post-RoPE queries, [B, q, Hq * dv]
        attention outputs (the output projection's input), [B, Hq, q] log-normalizers; each dropped once the
        layer's observers have run.
    """

    cache: EvictableCache
    positions: torch.Tensor
    prefill: bool
    input_ids: torch.Tensor | None = None
    want_log_normalizers: bool = False
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    log_normalizers: dict[int, torch.Tensor] = field(default_factory=dict)
