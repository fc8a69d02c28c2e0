"""SnapKV: an observation window votes for the prefix (Li et al., 2024, arXiv 2404.14469).

The last `window` prompt queries score the tokens before them; the scores are
pooled over neighbouring positions (1-D max-pool, kernel 7, by default) so that
whole spans survive; the window itself is always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from obcache.layer_state import LayerState
from obcache.policies.base import WindowPolicy, check_count, option

POOLINGS = {"max": "max-pool", "avg": "average-pool", "none": "no pooling"}


@dataclass
class SnapKV(WindowPolicy):
    """SnapKV with any score. pooling: "max" | "avg" | "none" over `kernel` positions (odd)."""

    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "scores from an observation window of the last `window` queries, pooled over neighbours; keeps the window"
    pooling: str = option("max", "pooling of the scores over neighbouring positions", POOLINGS)
    kernel: int = option(7, "pooling kernel (odd)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("kernel", self.kernel, minimum=1)
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd so pooling keeps positions aligned, got {self.kernel}")

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        length = layer.length
        scores = self.window_scores(layer, length - self.window, length)
        prefix = scores[..., : length - self.window]
        if self.pooling == "none" or prefix.shape[-1] == 0:
            return scores
        batch, kv_heads, width = prefix.shape
        if layer.key_mask is not None:  # padding slots pool as the kernel's own padding does: not at all
            real = layer.key_mask[..., :width]
            prefix = prefix.masked_fill(~(real.unsqueeze(1) if real.dim() == 2 else real),
                                        float("-inf") if self.pooling == "max" else 0.0)
        flat = prefix.reshape(batch * kv_heads, 1, width)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(flat, self.kernel, stride=1, padding=self.kernel // 2).view(batch, kv_heads, width)
        return torch.cat([pooled, scores[..., length - self.window :]], dim=-1)
