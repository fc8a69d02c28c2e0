"""What every eviction policy shares: the budget, protected tokens and top-k selection.

A policy sees one layer at a time, right after the prefill forward, through a
`LayerState`, and answers with the positions each KV head keeps. Subclasses
only say how tokens are scored (`token_scores`) and which are protected.

Budget vocabulary (one meaning everywhere): `budget` is what is **kept**, per
layer and KV head, counting protected tokens:

- a float in (0, 1]: the fraction of the prompt kept (kept = round(budget * L),
  L = the longest row's real prompt length);
- an int >= 1: the number of tokens kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from obcache.scores import check_score_kind, saliency


@dataclass
class LayerState:
    """One attention layer after prefill, as a policy sees it.

    keys, values: [B, Hkv, L, d] (keys post-RoPE), the layer's full cache.
    scaling: the module's logit scale.
    query_heads: Hq, the number of query heads (a multiple of Hkv).
    key_mask: [B, L] bool, False for left padding; None if no padding.
    queries: queries(start, end) -> [B, Hq, end - start, d], post-RoPE queries of
        prompt positions start..end-1, recomputed on demand.
    outputs: outputs(start, end) -> [B, Hq, end - start, dv], the attention
        outputs o_i the model computed for those positions (captured during the
        forward), or None: the scores then recompute them.
    """

    keys: torch.Tensor
    values: torch.Tensor
    scaling: float
    query_heads: int
    key_mask: torch.Tensor | None
    queries: Callable[[int, int], torch.Tensor]
    outputs: Callable[[int, int], torch.Tensor] | None = None

    def window(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(queries, outputs or None) of prompt positions start..end-1."""
        return self.queries(start, end), self.outputs(start, end) if self.outputs is not None else None

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def real_lengths(self) -> torch.Tensor:
        """[B] real (non-padding) prompt tokens per row."""
        if self.key_mask is None:
            return torch.full((self.keys.shape[0],), self.length, device=self.keys.device)
        return self.key_mask.sum(-1)


@dataclass
class Policy:
    """Base class of eviction policies. Fields are the policy's hyper-parameters.

    Subclasses set `name`, implement `token_scores`, and declare their
    protected tokens through `window_protected` (the last tokens) and `sinks`
    (the first real tokens).
    """

    name: ClassVar[str] = "policy"
    budget: float | int = 0.1
    score: str | None = "attention"
    sinks: int = 0

    def __post_init__(self) -> None:
        self._check_budget()
        if self.score is not None:
            check_score_kind(self.score)
        check_count("sinks", self.sinks, minimum=0)

    # -- what subclasses define --

    @property
    def window_protected(self) -> int:
        """How many of the last prompt tokens are always kept."""
        return 0

    @property
    def min_context(self) -> int:
        """The shortest prompt the policy can score (its query window)."""
        return 1

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        """Importance of every cached token, [B, Hkv, L] float32 (higher = keep)."""
        raise NotImplementedError

    def window_scores(self, layer: LayerState, start: int, end: int) -> torch.Tensor:
        """The policy's score from prompt queries start..end-1 over the keys they see, [B, Hkv, end]."""
        queries, outputs = layer.window(start, end)
        mask = layer.key_mask[:, :end] if layer.key_mask is not None else None
        return saliency(
            queries, layer.keys[:, :, :end], layer.values[:, :, :end], self.score,
            scaling=layer.scaling, key_mask=mask, outputs=outputs,
        )

    # -- shared machinery --

    def kept_tokens(self, prompt_length: int) -> int:
        """Tokens kept per KV head for a prompt of `prompt_length` real tokens."""
        if isinstance(self.budget, float):
            return min(prompt_length, max(1, round(self.budget * prompt_length)))
        return min(prompt_length, self.budget)

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        """Raise a clear error if the policy cannot run on prompts of these real lengths."""
        shortest, longest = min(prompt_lengths), max(prompt_lengths)
        if shortest < self.min_context:
            raise ValueError(
                f"{self.name}: the prompt has {shortest} tokens, shorter than the policy's query window "
                f"({self.min_context}); use a longer context or a smaller window"
            )
        protected = self.window_protected + self.sinks
        kept = self.kept_tokens(longest)
        if kept < longest and kept < protected:
            raise ValueError(
                f"{self.name}: budget {self.budget!r} keeps {kept} tokens of a {longest}-token prompt, fewer than "
                f"the {protected} protected tokens (window {self.window_protected} + sinks {self.sinks}); "
                "raise the budget or shrink the window/sinks"
            )

    def protected_mask(self, layer: LayerState) -> torch.Tensor:
        """[B, L] bool: the recent window and the first `sinks` real tokens of each row."""
        length = layer.length
        positions = torch.arange(length, device=layer.keys.device)
        protected = (positions >= length - self.window_protected).expand(layer.keys.shape[0], -1)
        if self.sinks:
            real = layer.key_mask if layer.key_mask is not None else torch.ones_like(protected)
            protected = protected | (real & (real.cumsum(-1) <= self.sinks))
        return protected

    def select(self, layer: LayerState) -> torch.Tensor | None:
        """Positions kept by each KV head, [B, Hkv, kept] in increasing order; None = keep all.

        Top-k of the scores; protected tokens are always kept and padding only
        fills slots a short row cannot fill with real tokens.
        """
        longest = layer.length if layer.key_mask is None else int(layer.real_lengths().max())  # no device sync
        kept = self.kept_tokens(longest)
        if kept >= layer.length:
            return None
        scores = self.token_scores(layer).float()
        scores = scores.masked_fill(self.protected_mask(layer).unsqueeze(1), float("inf"))
        if layer.key_mask is not None:
            scores = scores.masked_fill(~layer.key_mask.unsqueeze(1), float("-inf"))
        indices = scores.topk(kept, dim=-1, sorted=False).indices
        return indices.sort(dim=-1).values

    def attach(self, model):
        """Context manager: under it, `model(...)` and `model.generate(...)` evict after prefill."""
        from obcache.hooks import EvictionHooks

        return EvictionHooks(model, self)

    def _check_budget(self) -> None:
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)):
            raise TypeError(f"budget must be a float in (0, 1] (fraction kept) or an int >= 1 (tokens kept), got {budget!r}")
        if isinstance(budget, float) and not 0.0 < budget <= 1.0:
            raise ValueError(
                f"budget {budget} out of range: a float budget is the fraction of the prompt kept, in (0, 1]; "
                "use an int for a number of tokens"
            )
        if isinstance(budget, int) and budget < 1:
            raise ValueError(f"budget {budget} out of range: an int budget is the number of tokens kept, >= 1")


@dataclass
class WindowPolicy(Policy):
    """A policy scored by its last `window` prompt queries, which it also keeps."""

    window: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("window", self.window, minimum=1)

    @property
    def window_protected(self) -> int:
        return self.window

    @property
    def min_context(self) -> int:
        return self.window


def check_count(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
