"""StreamingLLM: attention sinks plus the most recent tokens (Xiao et al., 2024, arXiv 2309.17453).

No score: the first `sinks` real tokens and the most recent ones fill the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from obcache.policies.base import LayerState, Policy


@dataclass
class StreamingLLM(Policy):
    """Keep `sinks` first tokens and the most recent `budget - sinks` tokens."""

    name: ClassVar[str] = "streamingllm"
    score: str | None = None
    sinks: int = 4

    def __post_init__(self) -> None:
        if self.score is not None:
            raise ValueError("StreamingLLM takes no score: it keeps sinks and recent tokens by position")
        super().__post_init__()

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        """Later positions score higher, so top-k takes the most recent tokens."""
        batch, kv_heads, length = layer.keys.shape[:3]
        positions = torch.arange(length, dtype=torch.float32, device=layer.keys.device)
        return positions.expand(batch, kv_heads, length)
