"""Budget allocation across heads and layers, wrapping any policy (and each other).

    AdaKV(SnapKV(score="obc-joint", budget=0.1), alpha=0.2)
    AdaKV(PyramidKV(H2O(budget=256), beta=20))

`GlobalKV(policy)` pools the budget of every head of every layer (KVzip's
allocation). All conserve the total: AdaKV keeps budget x Hkv tokens per layer and batch
row, spread unevenly over the heads; PyramidKV gives deeper layers fewer
tokens, with the mean over layers equal to the budget. Heads of unequal
length live in the cache's paged layout, which frees what they drop.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.distributed as dist

from obcache.layer_state import LayerState
from obcache.policies.base import Attachable, Policy, check_choices, check_share
from obcache.selector import Replay, Selector, Widths
from obcache.selection import adaptive_mask, pyramid_budgets


@dataclass
class Wrapper(Attachable, Selector):
    """Wraps a policy (or another wrapper); forwards, by name, every step of the pipeline it does not replace."""

    name: ClassVar[str] = "wrapper"
    policy: Selector

    def __post_init__(self) -> None:
        if not isinstance(self.policy, Selector):
            raise TypeError(f"{type(self).__name__} wraps a policy (H2O, TOVA, SnapKV, ...), got {self.policy!r}")
        if self.policy.evicts_while_decoding:
            raise ValueError(f"{type(self).__name__} must wrap the policy inside Decoding, not Decoding itself: "
                             "Decoding(AdaKV(policy), ...), not AdaKV(Decoding(policy, ...))")
        check_choices(self)

    # -- the wrapped policy's named fields --

    @property
    def base(self) -> Policy:
        return self.policy.base

    @property
    def budget(self) -> float | int:
        """The prompt budget of the wrapped policy."""
        return self.policy.budget

    @property
    def group(self):
        return self.policy.group

    @property
    def chooses_across_heads(self) -> bool:
        return self.policy.chooses_across_heads

    @property
    def selects_after_all_layers(self) -> bool:
        return self.policy.selects_after_all_layers

    def replay(self) -> Replay | None:
        return self.policy.replay()

    def prepare(self, model, tokenizer=None, *, chat_template: bool = True) -> Wrapper:
        prepared = self.policy.prepare(model, tokenizer, chat_template=chat_template)
        return self if prepared is self.policy else replace(self, policy=prepared)

    def label(self) -> str:
        return f"{self.name}({self.policy.label()})"

    def allocation_label(self) -> str:
        inner = self.policy.allocation_label()
        return self.name if inner == "uniform" else f"{self.name}+{inner}"

    # -- the pipeline, forwarded --

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        self.policy.check_prompt(prompt_lengths)

    def kept_tokens(self, prompt_length: int) -> int:
        return self.policy.kept_tokens(prompt_length)

    def scoring(self) -> Hashable:
        return self.policy.scoring()

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        return self.policy.token_scores(layer)

    def layer_budget(self, layer: LayerState) -> torch.Tensor:
        return self.policy.layer_budget(layer)

    def prepared_scores(self, layer: LayerState, scores: torch.Tensor | None = None) -> torch.Tensor:
        return self.policy.prepared_scores(layer, scores)

    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer: LayerState) -> torch.Tensor:
        return self.policy.allocate(scores, kept, layer)

    def precision(self, layer: LayerState, mask: torch.Tensor | None,
                  scores: torch.Tensor | None) -> torch.Tensor | Widths | None:
        return self.policy.precision(layer, mask, scores)


@dataclass
class PooledBudget(Wrapper):
    """A wrapper whose heads draw on one pool of slots, each keeping at least alpha x budget tokens."""

    alpha: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_share("alpha", self.alpha, "the share of the budget every head keeps")

    @property
    def chooses_across_heads(self) -> bool:
        return True


@dataclass
class AdaKV(PooledBudget):
    """Head-adaptive budgets (Ada-KV, arXiv 2407.11550).

    Per layer and batch row, the budget x Hkv slots go to the best scores over
    all KV heads; every head keeps at least alpha x budget tokens (rounded up,
    and at least one), its protected tokens counted among them.
    """

    name: ClassVar[str] = "adakv"

    def __post_init__(self) -> None:
        super().__post_init__()
        _per_layer(self)
        if self.base.selection == "shared":
            raise ValueError("AdaKV gives heads different budgets; it needs selection='per-head', not 'shared'")

    @property
    def selects_after_all_layers(self) -> bool:  # per layer, unless the scores come from a replay
        return self.replay() is not None

    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer: LayerState) -> torch.Tensor:
        return adaptive_mask(scores, kept, head_floor(self.alpha, kept), self.group)


@dataclass
class GlobalKV(PooledBudget):
    """One pool for the whole model, as KVzip allocates (arXiv 2505.23416).

    Per batch row, the budget x Hkv x layers slots go to the best scores over
    every KV head of every layer; every head keeps at least alpha x budget
    tokens, its protected ones counted. Scores of different layers differ in
    scale (the OBCache ones with ||v||), so each layer's are first divided by
    their mean over the layer's real, unprotected tokens (unless the policy's
    are `comparable_across_layers`, as head ratings are). Needs every layer
    before choosing: the full cache is held until the end of the prefill.
    Under tensor parallelism (the policy's `group`), exact ties between ranks
    go to the lower rank (on one device: to the earlier layer).
    """

    name: ClassVar[str] = "global"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.policy, Wrapper):
            raise ValueError(
                f"global allocation sets every head's and layer's budget itself; wrap the policy directly, "
                f"not {type(self.policy).__name__}"
            )

    @property
    def selects_after_all_layers(self) -> bool:
        return True

    def select(self, layer: LayerState, scores: torch.Tensor | None = None) -> torch.Tensor | None:
        raise TypeError("global allocation chooses over all layers at once: use select_layers")

    def select_layers(self, layers: list[LayerState], scores: list[torch.Tensor]) -> list[torch.Tensor | None]:
        masks = pooled_select(self, layers, scores, self.alpha)
        return [self.precision(layer, mask, s) for layer, mask, s in zip(layers, masks, scores)]


def pooled_select(selector: Selector, layers: list[LayerState], scores: list[torch.Tensor],
                  alpha: float) -> list[torch.Tensor | None]:
    """GlobalKV's choice for `selector`'s prepared scores: budget x Hkv x layers slots per row over every head of
    every layer, each head keeping at least alpha x budget (see `GlobalKV`)."""
    kept = selector.layer_budget(layers[0])
    heads = layers[0].kv_heads
    if bool((kept >= layers[0].real_lengths()).all()):
        return [None] * len(layers)
    prepared = [selector.prepared_scores(layer, layer_scores) for layer, layer_scores in zip(layers, scores)]
    shared = prepared[0].shape[1]  # Hkv, or 1 with shared selection
    if not selector.base.comparable_across_layers:
        prepared = [_relative(layer_scores, selector.group) for layer_scores in prepared]
    pooled = torch.cat(prepared, dim=1)  # [B, layers x heads, L]
    mask = adaptive_mask(pooled, kept, head_floor(alpha, kept), selector.group)
    return [part.expand(-1, heads, -1) for part in mask.split(shared, dim=1)]


def _relative(scores: torch.Tensor, group=None) -> torch.Tensor:
    """Scores divided by their layer's mean over finite (real, unprotected) entries (of every rank's heads
    with a process `group`); +-inf kept."""
    finite = scores.isfinite()
    totals = torch.stack([scores.where(finite, 0.0).sum((1, 2)), finite.sum((1, 2)).to(scores.dtype)])  # [2, B]
    if group is not None:
        dist.all_reduce(totals, group=group)
    mean = (totals[0] / totals[1].clamp_min(1))[:, None, None]
    return scores / mean.clamp_min(torch.finfo(scores.dtype).tiny)


def head_floor(alpha: float, kept: torch.Tensor) -> torch.Tensor:
    """[B] tokens every head keeps at least: alpha x budget, rounded up, at least one (at most the budget)."""
    floors = torch.tensor([max(1, math.ceil(alpha * k)) for k in kept.tolist()], device=kept.device)
    return torch.minimum(kept, floors)


@dataclass
class PyramidKV(Wrapper):
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
        _per_layer(self)
        if self.base.needs_pooled_heads:
            raise ValueError(f"{self.base.name} rates whole heads: it needs budget moved between heads, which "
                             "PyramidKV does not do; use its default allocation, or AdaKV/GlobalKV")

    @property
    def selects_after_all_layers(self) -> bool:  # per layer, unless the scores come from a replay
        return self.replay() is not None

    def layer_budget(self, layer: LayerState) -> torch.Tensor:
        lengths = layer.real_lengths().tolist()
        return torch.tensor([self.layer_budgets(int(n), layer.num_layers)[layer.layer_idx] for n in lengths],
                            device=layer.keys.device)

    def layer_budgets(self, prompt_length: int, num_layers: int) -> list[int]:
        """Tokens kept per KV head in each layer for a prompt of `prompt_length` real tokens."""
        kept = self.policy.kept_tokens(prompt_length)
        protected = min(kept, self.base.window_protected + self.base.sinks)
        scored = pyramid_budgets(kept - protected, num_layers, self.beta, prompt_length - protected)
        return [protected + budget for budget in scored]


def _per_layer(wrapper: Wrapper) -> None:
    """A wrapper that chooses one layer at a time cannot wrap one that pools every layer."""
    if isinstance(wrapper.policy, GlobalKV):
        raise ValueError(f"{type(wrapper).__name__} chooses per layer; GlobalKV pools every layer and goes "
                         "outermost (GlobalKV(policy), or Decoding cannot use it)")
