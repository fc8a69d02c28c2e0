"""H2O: heavy hitters plus recent tokens (Zhang et al., 2023, arXiv 2306.14048).

Scores are accumulated over the last `window` prompt queries (or, with
`full_history`, over every prompt query, computed in query chunks so that no
L x L matrix is ever formed); the last `window` tokens are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from obcache.layer_state import LayerState
from obcache.policies.base import WindowPolicy, check_count, option


@dataclass
class H2O(WindowPolicy):
    """H2O with any score. window: query window and protected recent tokens.

    chunk_elements bounds each chunk's [B, Hq, chunk, L] score temporaries in
    the full-history mode: with the default (2^20 float32 = 4 MiB per temporary,
    a few alive at once) the extra peak memory of scoring SmolLM2 at 8k tokens
    is a few percent of its KV cache (`obcache bench` measures it).
    """

    name: ClassVar[str] = "h2o"
    decode_accumulates: ClassVar[bool] = True
    summary: ClassVar[str] = (
        "heavy hitters: scores summed over the last `window` queries (or all, --full-history); keeps the last `window` tokens"
    )
    full_history: bool = option(False, "sum scores over every prompt query (computed in chunks)")
    chunk_elements: int = option(1 << 20, "full history: elements of each query chunk's score temporaries")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("chunk_elements", self.chunk_elements, minimum=1)

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        length = layer.length
        if not self.full_history:
            return self.window_scores(layer, length - self.window, length)
        batch, kv_heads = layer.keys.shape[:2]
        chunk = max(1, self.chunk_elements // (batch * layer.query_heads * length))
        total = torch.zeros(batch, kv_heads, length, device=layer.keys.device)
        for start in range(0, length, chunk):
            # Queries start..end-1 see keys 0..end-1: they are the last of keys[:end].
            end = min(length, start + chunk)
            total[..., :end] += self.window_scores(layer, start, end)
        return total
