"""KVzip: query-agnostic scores from the model repeating its context (Kim et al., 2025, arXiv 2505.23416).

After the prefill, the model is asked to repeat the context and is
teacher-forced through it, `reconstruct_chunk` tokens per forward
(`obcache.reconstruction`). Those reconstruction queries stand for any future
question: every context token is scored by any score of `obcache.scores` over
them (KVzip itself: the attention weight, max over the queries and the G
query heads), and the best tokens are kept. The reconstruction's own tokens
are never kept.

`source="prefill"` is the cheaper variant: no second forward. The prefill's
own queries stand in for the reconstruction's: each is moved (RoPE-rotated)
to where its copy would sit, after the whole context (position i -> i + L),
and sees every context token, as a copy does. A query of token i then finds,
like the copying query, the token that follows it (induction heads look for
"what came after me"). What it lacks: the copy's own earlier tokens in the
softmax.

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

    def __post_init__(self) -> None:
        super().__post_init__()
        check_reduce(self.aggregate)
        check_count("reconstruct_chunk", self.reconstruct_chunk, minimum=1)
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}; allowed: {', '.join(SOURCES)}")

    @property
    def needs_reconstruction(self) -> bool:  # the cheaper variant scores at the prefill, one layer at a time
        return self.source == "reconstruction"

    @property
    def min_context(self) -> int:
        return max(2, self.sinks + 1)

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        if self.needs_reconstruction and len(prompt_lengths) != 1:
            raise ValueError(
                f"{self.name} reconstructs one context at a time; got a batch of {len(prompt_lengths)} prompts: "
                "compress them one by one (or use source='prefill')"
            )
        if min(prompt_lengths) < self.min_context:
            raise ValueError(
                f"{self.name}: a context of {min(prompt_lengths)} tokens is too short to reconstruct; it needs at "
                f"least {self.min_context} (more than its {self.sinks} sinks)"
            )
        super().check_prompt(prompt_lengths)

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        """source="prefill": every prompt query, moved L positions later, over the whole prompt."""
        if self.needs_reconstruction:
            raise TypeError(f"{self.name} scores tokens from the context reconstruction, not from the prompt's queries")
        if layer.rotate is None:
            raise ValueError(f"{self.name} with source='prefill' needs the model's RoPE to move the queries")
        length = layer.length
        queries = layer.rotate(layer.queries(0, length), length)
        return self._over_queries(layer, queries, 0, length)

    def reconstruction_scores(self, layer: LayerState, context_length: int) -> torch.Tensor:
        """[B, Hkv, context_length]: the score of every context token over the queries of one reconstruction
        forward (its tokens fill the layer's slots after `context_length`), aggregated by `aggregate`."""
        return self._over_queries(layer, layer.new_queries(), context_length, context_length)

    def _over_queries(self, layer: LayerState, queries: torch.Tensor, first_slot: int, context_length: int) -> torch.Tensor:
        """Scores of the first `context_length` slots over `queries` [B, Hq, W, d], in blocks of QUERY_BLOCK.

        Query j sits at slot first_slot + j and sees the slots up to its own (a reconstruction forward); with
        first_slot 0 (moved prefill queries) every query sees all `context_length` slots.
        """
        outputs = layer.new_outputs() if first_slot and layer.new_outputs is not None else None
        merged = None
        for start in range(0, queries.shape[-2], QUERY_BLOCK):
            end = min(queries.shape[-2], start + QUERY_BLOCK)
            if first_slot:
                seen, positions = first_slot + end, torch.arange(first_slot + start, first_slot + end)
            else:
                seen, positions = context_length, torch.full((end - start,), context_length - 1)
            mask = layer.key_mask[:, :seen] if layer.key_mask is not None else None
            block = saliency(
                queries[:, :, start:end], layer.keys[:, :, :seen], layer.values[:, :, :seen], self.score,
                scaling=layer.scaling, query_positions=positions.to(queries.device), key_mask=mask,
                outputs=outputs[:, :, start:end] if outputs is not None else None, gqa=self.gqa, reduce=self.aggregate,
            )[..., :context_length]
            merged = self.merge(merged, block)
        return merged

    def merge(self, total: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """Scores of two sets of reconstruction queries combined: their sum, or their max."""
        if total is None:
            return scores
        return total.add_(scores) if self.aggregate == "sum" else torch.maximum(total, scores, out=total)
