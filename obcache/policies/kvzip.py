"""KVzip: query-agnostic scores from the model repeating its context (Kim et al., 2025, arXiv 2505.23416).

After the prefill, the model is asked to repeat the context and is
teacher-forced through it, `reconstruct_chunk` tokens per forward
(`obcache.reconstruction`). Those reconstruction queries stand for any future
question: every context token is scored by any score of `obcache.scores` over
them (KVzip itself: the attention weight, max over the queries and the G
query heads), and the best tokens are kept. The reconstruction's own tokens
are never kept.

`source="prefill"` skips the second forward (and, on SmolLM2, the needles:
RESULTS.md). The prefill
stands in for its own copy: every `stride`-th prefill query, and all the
prefill's keys and values, are moved (RoPE-rotated) to where the copy would
sit, L positions later; a moved query then sees the whole context plus the
moved tokens up to its own, as the copying query does. A query of token i
finds, like the copying one, the token that follows it (induction heads look
for "what came after me"), and its recent-token heads find the moved copy,
not the context. What it lacks: the copy's own hidden states (the prefill's
are used; their queries have cosine ~0.8-0.9 with the real copy's on SmolLM2).

`source="heads"` is KVzip's context-independent variant: the model repeats
a calibration text once (`obcache.calibrate`, per model, not per context);
each KV head is rated by the mean of its reconstruction scores over that
text; then every context costs its prefill alone. All of a head's tokens
score its rating (the most recent first), so under `GlobalKV` or `AdaKV` the
pooled budget goes to whole heads in order of rating, and the others keep
their sinks and most recent tokens (the allocation's alpha x budget floor).
The ratings of all layers share one scale: `GlobalKV` ranks the heads of the
whole model against each other (no per-layer normalisation).

    KVzip(score="obc-key", budget=0.2)                       # per head, like every policy
    GlobalKV(KVzip(score="attention", budget=0.2))           # KVzip's head+layer top-k
    head_level = GlobalKV(KVzip(source="heads", budget=0.5))
    obcache.calibrate(model, tokenizer, head_level)          # once per model; then attach as usual
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from obcache.layer_state import LayerState
from obcache.policies.base import ScoredPolicy, check_count, option
from obcache.scores import QUERY_REDUCTIONS, check_reduce, saliency

QUERY_BLOCK = 256  # queries scored at once: bounds the [Hq, block, L] temporaries

SOURCES = {
    "reconstruction": "the model repeats the context, teacher-forced (a second forward over the context)",
    "prefill": "the prefill's own queries, moved after the context and shown all of it (no second forward)",
    "heads": "whole KV heads, rated once per model on a calibration text (obcache.calibrate); needs global or adakv",
}

#: source="heads": within a head, token p scores rating x (1 + RECENCY x p / L), the most recent first.
RECENCY = 1e-3


@dataclass
class KVzip(ScoredPolicy):
    """KVzip with any score: scored by context-reconstruction queries, merged by `aggregate`."""

    name: ClassVar[str] = "kvzip"
    summary: ClassVar[str] = "query-agnostic: scores from the queries of the model repeating the context (teacher-forced)"

    sinks: int = option(4, "first real tokens always kept")
    aggregate: str = option("max", "how the reconstruction queries' scores combine", QUERY_REDUCTIONS)
    source: str = option("reconstruction", "where the reconstruction queries come from", SOURCES)
    reconstruct_chunk: int = option(2048, "context tokens repeated per reconstruction forward")
    stride: int = option(1, "source='prefill': every stride-th prefill query replayed (cost / stride)")
    calibration: int = option(2048, "source='heads': tokens of the shipped text the model repeats once to rate heads")
    #: source="heads": [layers, Hkv] head ratings, set by `obcache.calibrate` (or given, e.g. saved from a run).
    head_scores: torch.Tensor | None = field(default=None, repr=False, compare=False)
    #: The model `obcache.calibrate` rated them on (a weak reference); None for ratings given by the user.
    rated_on: object | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_reduce(self.aggregate)
        check_count("reconstruct_chunk", self.reconstruct_chunk, minimum=1)
        check_count("stride", self.stride, minimum=1)
        check_count("calibration", self.calibration, minimum=self.min_context)
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; allowed: {', '.join(SOURCES)}")

    @property
    def needs_reconstruction(self) -> bool:  # the cheaper variant scores at the prefill, one layer at a time
        return self.source == "reconstruction"

    @property
    def comparable_across_layers(self) -> bool:  # head ratings: one score over one calibration text
        return self.source == "heads"

    @property
    def min_context(self) -> int:
        return max(2, self.sinks + 1)

    def check_ready(self) -> None:
        if self.source == "heads" and self.head_scores is None:
            raise ValueError(f"{self.name} with source='heads' is not calibrated: call obcache.calibrate(model, "
                             "tokenizer, policy) once before compressing")

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        if self.source != "heads" and len(prompt_lengths) != 1:  # the prefill source would also replay padding queries
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

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        """source="prefill": the prompt replayed as its own copy (module docstring), every stride-th query;
        source="heads": the head's rating (module docstring)."""
        if self.needs_reconstruction:
            raise TypeError(f"{self.name} scores tokens from the context reconstruction, not from the prompt's queries")
        if self.source == "heads":
            return self._head_ratings(layer)
        if layer.rotate is None:
            raise ValueError(f"{self.name} with source='prefill' needs the model's RoPE to move the queries")
        length = layer.length
        keys = torch.cat([layer.keys, layer.rotate(layer.keys, length)], dim=-2)
        values = torch.cat([layer.values, layer.values], dim=-2)
        mask = torch.cat([layer.key_mask, layer.key_mask], dim=-1) if layer.key_mask is not None else None
        slots = torch.arange(0, length, self.stride, device=layer.keys.device)
        queries = layer.rotate(layer.queries(0, length)[:, :, slots], length)
        return self._over_queries(layer, queries, keys, values, mask, slots + length, None, length)

    def _head_ratings(self, layer: LayerState) -> torch.Tensor:
        """[B, Hkv, L]: rating_h x (1 + RECENCY x p / L) for token p of KV head h (p counted from the row's first
        real token, L its real tokens)."""
        expected = (layer.num_layers, layer.kv_heads)
        if tuple(self.head_scores.shape) != expected:
            raise ValueError(f"{self.name}: head_scores has shape {tuple(self.head_scores.shape)}, but the model has "
                             f"{expected[0]} layers of {expected[1]} KV heads: calibrate on this model")
        rating = self.head_scores[layer.layer_idx].to(layer.keys.device, torch.float32)
        slots = torch.arange(layer.length, device=layer.keys.device, dtype=torch.float32)
        recency = (slots - layer.starts()[..., None]) * (RECENCY / layer.real_lengths()[:, None, None]) + 1.0
        return (rating[:, None] * recency).expand(layer.keys.shape[0], -1, -1)

    def reconstruction_scores(self, layer: LayerState, context_length: int) -> torch.Tensor:
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
            block = saliency(
                queries[:, :, start:end], keys[:, :, :seen], values[:, :, :seen], self.score, scaling=layer.scaling,
                query_positions=slots[start:end], key_mask=key_mask[:, :seen] if key_mask is not None else None,
                outputs=outputs[:, :, start:end] if outputs is not None else None, gqa=self.gqa, reduce=self.aggregate,
                log_normalizers=normalizers[:, :, start:end] if normalizers is not None else None,
            )[..., :context_length]
            merged = self.merge(merged, block)
        return merged

    def merge(self, total: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """Scores of two sets of reconstruction queries combined: their sum, or their max."""
        if total is None:
            return scores
        return total.add_(scores) if self.aggregate == "sum" else torch.maximum(total, scores, out=total)
