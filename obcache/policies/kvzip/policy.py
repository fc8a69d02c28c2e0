"""KVzip: query-agnostic scores from the model repeating its context (Kim et al., 2025, arXiv 2505.23416).

Three members, one per source of the queries that stand for any future question:

- `KVzip` (the paper): after the prefill, the model is asked to repeat the
  context and is teacher-forced through it, `reconstruct_chunk` tokens per
  forward (`policies/kvzip/prompts.py`, run by `obcache.after_prefill` as the policy's
  `replay`). Those reconstruction queries score every context token with any
  score of `obcache.scores` (KVzip itself: the attention weight, max over the
  queries and the G query heads). The reconstruction's own tokens are never kept.
- `KVzipReplay`: no second forward. The prefill stands in for its own copy:
  every `stride`-th prefill query, and all the prefill's keys and values, are
  moved (RoPE-rotated) L positions later, where the copy would sit; a moved
  query sees the whole context plus the moved tokens up to its own, as the
  copying query does. What it lacks: the copy's own hidden states (on SmolLM2
  the needles: RESULTS.md).
- `KVzipHeads`, the paper's context-independent variant: the model repeats a
  calibration text once per model (`prepare`, fitted `HeadRatings`); each KV
  head is rated by the mean of its reconstruction scores over that text; then
  every context costs its prefill alone. All of a head's tokens score its
  rating (the most recent first), so the pooled budget goes to whole heads in
  order of rating, and the others keep their sinks and most recent tokens (the
  alpha x budget floor). The ratings of all layers share one scale.

Each defaults to the paper's allocation, `allocation="global"`: one budget pool
over every KV head of every layer (as `GlobalKV` does; each head keeps at least
alpha x budget). `allocation="uniform"` gives every head the budget, like any
policy (not for `KVzipHeads`, which rates whole heads).

    KVzip(score="obc-key", budget=0.2)                 # the paper, with an OBCache score
    KVzipHeads(score="attention", budget=0.5)          # rated once per model, then the prefill alone
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from obcache.policies.kvzip.calibration import HeadRatings, fit_head_ratings
from obcache.policies.kvzip.prompts import reconstruction_inputs
from obcache.layer_state import LayerState
from obcache.models import fingerprint, layers_and_kv_heads
from obcache.policies.allocation import pooled_select
from obcache.policies.base import ScoredPolicy, check_count, check_share, option
from obcache.selector import Replay
from obcache.scores import QUERY_REDUCTIONS

QUERY_BLOCK = 256  # queries scored at once: bounds the [Hq, block, L] temporaries

ALLOCATIONS = {
    "global": "one budget pool over every KV head of every layer (the paper), each head >= alpha x budget",
    "uniform": "every KV head of every layer keeps the budget",
}

#: KVzipHeads: within a head, token p scores rating x (1 + RECENCY x p / L), the most recent first.
RECENCY = 1e-3


@dataclass
class KVzipBase(ScoredPolicy):
    """What the KVzip family shares: sinks, the aggregation over queries, and the paper's global allocation."""

    one_context: ClassVar[bool] = True  # a replay of the prompt (not head ratings): one context at a time

    sinks: int = option(4, "first real tokens always kept")
    aggregate: str = option("max", "how the reconstruction queries' scores combine", QUERY_REDUCTIONS,
                            noun="aggregation over queries")
    allocation: str = option("global", "how the budget spreads over heads and layers", ALLOCATIONS)
    alpha: float = option(0.2, "global allocation: share of the budget every head keeps")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_share("alpha", self.alpha, "the share of the budget every head keeps")

    @property
    def min_context(self) -> int:
        return max(2, self.sinks + 1)

    @property
    def chooses_across_heads(self) -> bool:
        return self.allocation == "global" or super().chooses_across_heads

    @property
    def selects_after_all_layers(self) -> bool:
        return self.allocation == "global" or self.replay() is not None

    def select_layers(self, layers: list[LayerState], scores: list[torch.Tensor]) -> list[torch.Tensor | None]:
        if self.allocation == "global":
            masks = pooled_select(self, layers, scores, self.alpha)
            return [self.precision(layer, mask, s) for layer, mask, s in zip(layers, masks, scores)]
        return super().select_layers(layers, scores)

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        if self.one_context and len(prompt_lengths) != 1:  # the replay would replay padding queries too
            raise ValueError(
                f"{self.name} reconstructs one context at a time; got a batch of {len(prompt_lengths)} prompts: "
                "compress them one by one"
            )
        if min(prompt_lengths) < self.min_context:
            raise ValueError(
                f"{self.name}: a context of {min(prompt_lengths)} tokens is too short to reconstruct; it needs at "
                f"least {self.min_context} (more than its {self.sinks} sinks)"
            )
        super().check_prompt(prompt_lengths)

    def merge(self, total: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """Scores of two sets of reconstruction queries combined: their sum, or their max."""
        if total is None:
            return scores
        return total.add_(scores) if self.aggregate == "sum" else torch.maximum(total, scores, out=total)

    def _over_queries(self, layer: LayerState, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      key_mask: torch.Tensor | None, slots: torch.Tensor, outputs: torch.Tensor | None,
                      context_length: int, normalizers: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of the first `context_length` slots over `queries` [B, Hq, W, d] at `slots` [W] (each sees
        the slots up to its own; `normalizers`: see `saliency`'s log_normalizers), in blocks of QUERY_BLOCK
        queries."""
        merged = None
        for start in range(0, queries.shape[-2], QUERY_BLOCK):
            end = min(queries.shape[-2], start + QUERY_BLOCK)
            seen = int(slots[end - 1]) + 1
            block = self.saliency(
                queries[:, :, start:end], keys[:, :, :seen], values[:, :, :seen], layer.scaling, reduce=self.aggregate,
                query_positions=slots[start:end], key_mask=key_mask[:, :seen] if key_mask is not None else None,
                outputs=outputs[:, :, start:end] if outputs is not None else None,
                log_normalizers=normalizers[:, :, start:end] if normalizers is not None else None,
            )[..., :context_length]
            merged = self.merge(merged, block)
        return merged


@dataclass
class KVzip(KVzipBase):
    """KVzip with any score: scored by the queries of the model repeating the context, merged by `aggregate`."""

    name: ClassVar[str] = "kvzip"
    summary: ClassVar[str] = "query-agnostic: scores from the queries of the model repeating the context (teacher-forced)"

    reconstruct_chunk: int = option(2048, "context tokens repeated per reconstruction forward")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("reconstruct_chunk", self.reconstruct_chunk, minimum=1)

    def replay(self) -> Replay:
        return self

    def prepare(self, model, tokenizer=None, *, chat_template: bool = True) -> KVzip:
        if tokenizer is None:
            raise ValueError(f"{self.name} makes the model repeat the context and needs the tokenizer to write that "
                             "prompt: policy.attach(model, tokenizer=tokenizer)")
        return self

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        raise TypeError(f"{self.name} scores tokens from the context reconstruction, not from the prompt's queries")

    # -- the replay: the model repeating its context --

    def replay_inputs(self, tokenizer, context_ids: list[int], *, chat_template: bool) -> list[list[int]]:
        return reconstruction_inputs(tokenizer, context_ids, chunk=self.reconstruct_chunk, chat_template=chat_template)

    def replay_scoring(self) -> Hashable:
        return self.score, self.gqa, self.aggregate

    def replay_scores(self, layer: LayerState, context_length: int) -> torch.Tensor:
        """[B, Hkv, context_length]: the score of every context token over the queries of one reconstruction
        forward (its tokens fill the layer's slots after `context_length`), aggregated by `aggregate`."""
        queries = layer.new_queries()
        outputs = layer.new_outputs() if layer.new_outputs is not None else None
        normalizers = layer.new_log_normalizers
        if normalizers is not None and outputs is not None:
            # The softmax denominators over all keys are known: only the context's keys need scoring, and
            # every reconstruction query sees all of them.
            slots = torch.full((queries.shape[-2],), context_length - 1, device=queries.device)
            mask = layer.key_mask[:, :context_length] if layer.key_mask is not None else None
            return self._over_queries(layer, queries, layer.keys[:, :, :context_length],
                                      layer.values[:, :, :context_length], mask, slots, outputs, context_length,
                                      normalizers)
        slots = torch.arange(context_length, context_length + queries.shape[-2], device=queries.device)
        return self._over_queries(layer, queries, layer.keys, layer.values, layer.key_mask, slots, outputs,
                                  context_length)


@dataclass
class KVzipReplay(KVzipBase):
    """KVzip without the second forward: the prefill's queries, moved after the context, stand for the copy's."""

    name: ClassVar[str] = "kvzip-replay"
    summary: ClassVar[str] = "query-agnostic: the prefill's queries moved after the context stand for the copy's"

    stride: int = option(1, "every stride-th prefill query replayed (cost / stride)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("stride", self.stride, minimum=1)

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        """The prompt replayed as its own copy (module docstring), every stride-th query."""
        if layer.rotate is None:
            raise ValueError(f"{self.name} needs the model's RoPE to move the queries")
        length = layer.length
        keys = torch.cat([layer.keys, layer.rotate(layer.keys, length)], dim=-2)
        values = torch.cat([layer.values, layer.values], dim=-2)
        mask = torch.cat([layer.key_mask, layer.key_mask], dim=-1) if layer.key_mask is not None else None
        slots = torch.arange(0, length, self.stride, device=layer.keys.device)
        queries = layer.rotate(layer.queries(0, length)[:, :, slots], length)
        return self._over_queries(layer, queries, keys, values, mask, slots + length, None, length)


@dataclass
class KVzipHeads(KVzipBase):
    """KVzip's head-level variant: whole KV heads rated once per model, then every context costs its prefill."""

    name: ClassVar[str] = "kvzip-heads"
    summary: ClassVar[str] = "query-agnostic: whole KV heads rated once per model by a repeated text; prefill cost only"
    needs_pooled_heads: ClassVar[bool] = True
    one_context: ClassVar[bool] = False  # no replay: batches are fine

    calibration: int = option(2048, "tokens of the shipped text the model repeats once to rate the heads")
    reconstruct_chunk: int = option(2048, "calibration tokens repeated per reconstruction forward")
    #: [layers, Hkv] ratings: fitted on a model by `prepare` (`HeadRatings`), or given as a tensor (any model of
    #: that shape; e.g. saved from a run).
    ratings: HeadRatings | torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("calibration", self.calibration, minimum=self.min_context)
        check_count("reconstruct_chunk", self.reconstruct_chunk, minimum=1)
        if self.allocation == "uniform":
            raise ValueError(f"{self.name} rates whole heads: it needs the budget moved between heads, "
                             "allocation='global' (the default), or AdaKV(KVzipHeads(...))")

    @property
    def comparable_across_layers(self) -> bool:  # one score over one calibration text
        return True

    def prepare(self, model, tokenizer=None, *, chat_template: bool = True) -> KVzipHeads:
        """This policy with ratings fitted on `model` (fitted once per model and setting, then reused)."""
        shape = layers_and_kv_heads(model)
        if isinstance(self.ratings, torch.Tensor):
            _check_shape(self, tuple(self.ratings.shape), shape)
            return self
        identity = fingerprint(model)
        if self.ratings is not None:
            _check_shape(self, tuple(self.ratings.scores.shape), shape)
            if self.ratings.model == identity:
                return self
        if tokenizer is None:
            why = "its ratings were fitted on another model" if self.ratings is not None else "it is not rated yet"
            raise ValueError(f"{self.name} must rate this model's heads first ({why}): it makes the model repeat a "
                             "text, which needs the tokenizer: attach(model, policy, tokenizer=tokenizer)")
        probe = KVzip(budget=self.budget, score=self.score, gqa=self.gqa, aggregate=self.aggregate, sinks=self.sinks,
                      reconstruct_chunk=self.reconstruct_chunk)
        ratings = fit_head_ratings(model, tokenizer, probe, calibration=self.calibration, sinks=self.sinks,
                                   identity=identity, chat_template=chat_template)
        return replace(self, ratings=ratings)

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        """[B, Hkv, L]: rating_h x (1 + RECENCY x p / L) for token p of KV head h (p counted from the row's first
        real token, L its real tokens)."""
        if self.ratings is None:
            raise ValueError(f"{self.name} is not rated: prepare it on the model first (attach does)")
        ratings = self.ratings if isinstance(self.ratings, torch.Tensor) else self.ratings.scores
        expected = (layer.num_layers, layer.kv_heads)
        _check_shape(self, tuple(ratings.shape), expected)
        rating = ratings[layer.layer_idx].to(layer.keys.device, torch.float32)
        slots = torch.arange(layer.length, device=layer.keys.device, dtype=torch.float32)
        recency = (slots - layer.starts()[..., None]) * (RECENCY / layer.real_lengths()[:, None, None]) + 1.0
        return (rating[:, None] * recency).expand(layer.keys.shape[0], -1, -1)


def _check_shape(policy: KVzipHeads, shape: tuple, expected: tuple) -> None:
    if shape != expected:
        raise ValueError(f"{policy.name}: its head ratings have shape {shape}, but the model has {expected[0]} layers "
                         f"of {expected[1]} KV heads: rate the heads on this model (ratings=None)")
