"""StreamingLLM: attention sinks plus the most recent tokens (Xiao et al., 2024, arXiv 2309.17453).

No score: the first `sinks` real tokens and the most recent ones fill the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from obcache.layer_state import LayerState
from obcache.policies.base import Policy, option


@dataclass
class StreamingLLM(Policy):
    """Keep `sinks` first tokens and the most recent `budget - sinks` tokens."""

    name: ClassVar[str] = "streamingllm"
    summary: ClassVar[str] = "no score: `sinks` first tokens plus the most recent tokens"
    sinks: int = option(4, "first real tokens always kept")

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        """Later positions (counted from each row's first real token) score higher, so top-k takes the most
        recent tokens."""
        batch, kv_heads, length = layer.keys.shape[:3]
        slots = torch.arange(length, dtype=torch.float32, device=layer.keys.device)
        return (slots - layer.starts()[..., None]).expand(batch, kv_heads, length)
