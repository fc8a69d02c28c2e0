"""TOVA: token omission via attention (Oren et al., 2024, arXiv 2401.06104).

Tokens are scored by the last prompt query alone; nothing is protected beyond
optional sinks, so the whole budget goes to the scored tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from obcache.layer_state import LayerState
from obcache.policies.base import ScoredPolicy


@dataclass
class TOVA(ScoredPolicy):
    """TOVA with any score: the window is the last query."""

    name: ClassVar[str] = "tova"
    summary: ClassVar[str] = "scores from the last query only; the whole budget goes to scored tokens"

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        return self.window_scores(layer, layer.length - 1, layer.length)
