"""KVzip: query-agnostic scores from the model repeating its context (Kim et al., 2025, arXiv 2505.23416).

After the prefill, the model is asked to repeat the context and is
teacher-forced through it, `reconstruct_chunk` tokens per forward
(`obcache.reconstruction`). Those reconstruction queries stand for any future
question: every context token is scored by any score of `obcache.scores` over
them (KVzip itself: the attention weight, max over the queries and the G
query heads), and the best tokens are kept. The reconstruction's own tokens
are never kept.

`source="prefill"` is the cheaper variant: no second forward. The prefill
stands in for its own copy: every `stride`-th prefill query, and all the
prefill's keys and values, are moved (RoPE-rotated) to where the copy would
sit, L positions later; a moved query then sees the whole context plus the
moved tokens up to its own, as the copying query does. A query of token i
finds, like the copying one, the token that follows it (induction heads look
for "what came after me"), and its recent-token heads find the moved copy,
not the context. What it lacks: the copy's own hidden states (the prefill's
are used; their queries have cosine ~0.8-0.9 with the real copy's on SmolLM2).

    KVzip(score="obc-key", budget=0.2)                       # per head, like every policy
    GlobalKV(KVzip(score="attention", budget=0.2))           # KVzip's head+layer top-k
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from obcache.layer_state import LayerState
from obcache.policies.base import ScoredPolicy, check_count, option
from obcache.scores import QUERY_REDUCTIONS, check_reduce, saliency

QUERY_BLOCK = 256  # queries scored at once: bounds the [Hq, block, L] temporaries

SOURCES = {
    "reconstruction": "the model repeats the context, teacher-forced (a second forward over the context)",
    "prefill": "the prefill's own queries, moved after the context and shown all of it (no second forward)",
}


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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_reduce(self.aggregate)
        check_count("reconstruct_chunk", self.reconstruct_chunk, minimum=1)
        check_count("stride", self.stride, minimum=1)
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; allowed: {', '.join(SOURCES)}")

    @property
    def needs_reconstruction(self) -> bool:  # the cheaper variant scores at the prefill, one layer at a time
        return self.source == "reconstruction"

    @property
    def min_context(self) -> int:
        return max(2, self.sinks + 1)

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        if len(prompt_lengths) != 1:  # the prefill source would also replay padding queries
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
        """source="prefill": the prompt replayed as its own copy (module docstring), every stride-th query."""
        if self.needs_reconstruction:
            raise TypeError(f"{self.name} scores tokens from the context reconstruction, not from the prompt's queries")
        if layer.rotate is None:
            raise ValueError(f"{self.name} with source='prefill' needs the model's RoPE to move the queries")
        length = layer.length
        keys = torch.cat([layer.keys, layer.rotate(layer.keys, length)], dim=-2)
        values = torch.cat([layer.values, layer.values], dim=-2)
        mask = torch.cat([layer.key_mask, layer.key_mask], dim=-1) if layer.key_mask is not None else None
        slots = torch.arange(0, length, self.stride, device=layer.keys.device)
        queries = layer.rotate(layer.queries(0, length)[:, :, slots], length)
        return self._over_queries(layer, queries, keys, values, mask, slots + length, None, length)

    def reconstruction_scores(self, layer: LayerState, context_length: int) -> torch.Tensor:
        """[B, Hkv, context_length]: the score of every context token over the queries of one reconstruction
        forward (its tokens fill the layer's slots after `context_length`), aggregated by `aggregate`."""
        queries = layer.new_queries()
        slots = torch.arange(context_length, context_length + queries.shape[-2], device=queries.device)
        outputs = layer.new_outputs() if layer.new_outputs is not None else None
        return self._over_queries(layer, queries, layer.keys, layer.values, layer.key_mask, slots, outputs,
                                  context_length)

    def _over_queries(self, layer: LayerState, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      key_mask: torch.Tensor | None, slots: torch.Tensor, outputs: torch.Tensor | None,
                      context_length: int) -> torch.Tensor:
        """Scores of the first `context_length` slots over `queries` [B, Hq, W, d] at `slots` [W] (each sees
        the slots up to its own), in blocks of QUERY_BLOCK queries."""
        merged = None
        for start in range(0, queries.shape[-2], QUERY_BLOCK):
            end = min(queries.shape[-2], start + QUERY_BLOCK)
            seen = int(slots[end - 1]) + 1
            block = saliency(
                queries[:, :, start:end], keys[:, :, :seen], values[:, :, :seen], self.score, scaling=layer.scaling,
                query_positions=slots[start:end], key_mask=key_mask[:, :seen] if key_mask is not None else None,
                outputs=outputs[:, :, start:end] if outputs is not None else None, gqa=self.gqa, reduce=self.aggregate,
            )[..., :context_length]
            merged = self.merge(merged, block)
        return merged

    def merge(self, total: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """Scores of two sets of reconstruction queries combined: their sum, or their max."""
        if total is None:
            return scores
        return total.add_(scores) if self.aggregate == "sum" else torch.maximum(total, scores, out=total)
