"""Budget allocation across heads and layers, wrapping any policy (and each other).

    AdaKV(SnapKV(score="obc-joint", budget=0.1), alpha=0.2)
    AdaKV(PyramidKV(H2O(budget=256), beta=20))

Both conserve the total: AdaKV keeps budget x Hkv tokens per layer and batch
row, spread unevenly over the heads; PyramidKV gives deeper layers fewer
tokens, with the mean over layers equal to the budget. Heads of unequal
length live in the cache's ragged layout, which frees what they drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from obcache.layer_state import LayerState
from obcache.policies.base import Policy
from obcache.selection import adaptive_mask, pyramid_budgets


@dataclass
class BudgetWrapper:
    """Wraps a policy; delegates every step of the selection pipeline it does not replace."""

    name: ClassVar[str] = "wrapper"
    policy: Policy | BudgetWrapper

    def __post_init__(self) -> None:
        if not isinstance(self.policy, (Policy, BudgetWrapper)):
            raise TypeError(f"{type(self).__name__} wraps a policy (H2O, TOVA, SnapKV, ...), got {self.policy!r}")

    def __getattr__(self, attribute: str):
        # budget, score, window, sinks, selection, ... of the wrapped policy (dataclass fields are found first)
        if attribute == "policy":
            raise AttributeError(attribute)
        return getattr(self.policy, attribute)

    def kept_tokens(self, prompt_length: int) -> int:
        return self.policy.kept_tokens(prompt_length)

    def layer_budget(self, layer: LayerState) -> int:
        return self.policy.layer_budget(layer)

    def prepared_scores(self, layer: LayerState, scores: torch.Tensor | None = None) -> torch.Tensor:
        return self.policy.prepared_scores(layer, scores)

    def allocate(self, scores: torch.Tensor, kept: int, layer: LayerState) -> torch.Tensor:
        return self.policy.allocate(scores, kept, layer)

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        self.policy.check_prompt(prompt_lengths)

    select = Policy.select
    attach = Policy.attach


@dataclass
class AdaKV(BudgetWrapper):
    """Head-adaptive budgets (Ada-KV, arXiv 2407.11550).

    Per layer and batch row, the budget x Hkv slots go to the best scores over
    all KV heads; every head keeps at least alpha x budget tokens (rounded up,
    and at least one) besides what it protects.
    """

    name: ClassVar[str] = "adakv"
    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1] (the share of the budget every head keeps), got {self.alpha!r}")
        if self.policy.selection == "shared":
            raise ValueError("AdaKV gives heads different budgets; it needs selection='per-head', not 'shared'")

    def allocate(self, scores: torch.Tensor, kept: int, layer: LayerState) -> torch.Tensor:
        floor = min(kept, max(1, math.ceil(self.alpha * kept)))
        return adaptive_mask(scores, kept, floor)


@dataclass
class PyramidKV(BudgetWrapper):
    """Layer budgets that fall linearly with depth (PyramidKV, arXiv 2406.02069).

    Of each layer's budget, the protected tokens stay; the scored remainder s
    (budget - window - sinks) goes from 2s - s/beta in the first layer to
    s/beta in the last, so the mean over layers is the budget.
    """

    name: ClassVar[str] = "pyramid"
    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not self.beta >= 1:
            raise ValueError(f"beta must be a number >= 1 (first/last layer budget ratio parameter), got {self.beta!r}")

    def layer_budget(self, layer: LayerState) -> int:
        return self.layer_budgets(layer.longest(), layer.num_layers)[layer.layer_idx]

    def layer_budgets(self, prompt_length: int, num_layers: int) -> list[int]:
        """Tokens kept per KV head in each layer for a prompt of `prompt_length` real tokens."""
        kept = self.policy.kept_tokens(prompt_length)
        protected = min(kept, self.policy.window_protected + self.policy.sinks)
        scored = pyramid_budgets(kept - protected, num_layers, self.beta, prompt_length - protected)
        return [protected + budget for budget in scored]
