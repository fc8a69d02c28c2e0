"""Context reconstruction (KVzip, arXiv 2505.23416): queries that stand for any future question.

After the prefill of a context, the model is asked to repeat it: a prompt,
then the context itself, teacher-forced, one chunk per forward:

    chunk 0:  "\\n\\nRepeat the previous context exactly." + answer header + chunk 0
    chunk i:  "\\n\\nRepeat the part of the previous context exactly, starting with "
              + last 8 tokens of chunk i-1 + answer header + chunk i

Each forward runs on a scratch copy of the full cache, so the chunk's own
tokens are never kept and the chunks do not see each other. After every
attention layer, each policy scores the context tokens from the forward's
queries and attention outputs (the same capture path as the prefill's), and
the scores of all chunks are merged (`KVzip.merge`).

    inputs = reconstruction_inputs(tokenizer, context_ids, chunk=2048)
    scores = reconstruct(model, cache, inputs, {"a": KVzip(score="obc-key")})  # key -> per layer [B, Hkv, L]

`select_after_prefill` is where every selector that needs all layers first
(KVzip, or any policy under `GlobalKV`) makes its choice, for the eviction
hooks and the evaluation's fan-out alike.

Run under `obcache.attach(model)` (or a policy's `attach`): the scratch caches
are read by obcache's attention function.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping

import torch
from torch import nn

from obcache.cache import EvictableCache
from obcache.capture import LayerHooks
from obcache.layer_state import LayerState
from obcache.policies.allocation import innermost

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with "
OVERLAP = 8  # tokens of the previous chunk that tell the model where to start


def answer_header(tokenizer, chat_template: bool = True) -> str:
    """What the chat template puts between a user message and the assistant's answer ("\\n" without one)."""
    if not chat_template or getattr(tokenizer, "chat_template", None) is None:
        return "\n"
    marker = "\x00OBCACHE\x00"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
    return rendered.split(marker, 1)[1]


def reconstruction_inputs(tokenizer, context_ids: list[int], *, chunk: int, chat_template: bool = True) -> list[list[int]]:
    """The teacher-forced inputs that make the model repeat `context_ids`, one list per chunk of `chunk` tokens."""
    if chunk < 1:
        raise ValueError(f"the reconstruction chunk must be >= 1 token, got {chunk}")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    header = encode(answer_header(tokenizer, chat_template))
    chunks = [context_ids[start:start + chunk] for start in range(0, len(context_ids), chunk)]
    inputs = []
    for index, part in enumerate(chunks):
        prompt = encode(FIRST_PROMPT) if index == 0 else encode(NEXT_PROMPT) + chunks[index - 1][-OVERLAP:]
        inputs.append(prompt + header + part)
    return inputs


class _Scorer(LayerHooks):
    """Merges, per policy and layer, the context scores of every reconstruction forward.

    Policies that score alike (same score, GQA reduction and aggregation) share one computation."""

    def __init__(self, model: nn.Module, policies: Mapping[Hashable, object], context_length: int):
        super().__init__(model, first=True, attached=True)  # first: before the eviction hooks drop the queries
        self.context_length = context_length
        self.scorers = {_scoring(policy): policy for policy in policies.values()}
        self.scores: dict[tuple, list[torch.Tensor | None]] = {key: [None] * len(self.attentions) for key in self.scorers}
        self.seconds = dict.fromkeys(self.scorers, 0.0)

    def wants_state(self, prefill: bool) -> bool:
        return not prefill

    def layer_done(self, layer_idx: int, state: LayerState, cache: EvictableCache, prefill: bool) -> None:
        for key, policy in self.scorers.items():
            start = time.perf_counter()
            scores = policy.reconstruction_scores(state, self.context_length)
            self.scores[key][layer_idx] = policy.merge(self.scores[key][layer_idx], scores)
            self.seconds[key] += time.perf_counter() - start


def _scoring(policy) -> tuple:
    return policy.score, policy.gqa, policy.aggregate


@torch.no_grad()
def reconstruct(model: nn.Module, cache: EvictableCache, inputs: list[list[int]],
                policies: Mapping[Hashable, object]) -> tuple[dict[Hashable, list[torch.Tensor]], dict[Hashable, float]]:
    """Per policy, per layer, the [1, Hkv, L] scores of the L context tokens of `cache` over the reconstruction
    `inputs` (each policy's `reconstruction_scores`, merged over the chunks by its `merge`); and per policy the
    seconds it would have taken alone (the forwards plus its own scoring)."""
    scorer = _Scorer(model, policies, cache.seen_tokens)
    start = time.perf_counter()
    with scorer:
        for ids in inputs:
            scratch = cache.fork()  # shares the context's tensors; the chunk's are dropped with it
            scratch.log_normalizers = {}  # the scores then need the context's keys only
            model(input_ids=torch.tensor([ids], device=model.device), past_key_values=scratch, use_cache=True,
                  position_ids=scratch.positions_for(len(ids), model.device), logits_to_keep=1)
    forwards = time.perf_counter() - start - sum(scorer.seconds.values())
    scores = {key: scorer.scores[_scoring(policy)] for key, policy in policies.items()}
    return scores, {key: forwards + scorer.seconds[_scoring(policy)] for key, policy in policies.items()}


def select_after_prefill(
    model: nn.Module, cache: EvictableCache, context_ids: list[int], selectors: Mapping[Hashable, object],
    prefill_scores: Mapping[Hashable, list[torch.Tensor]], *, tokenizer=None, chat_template: bool = True,
) -> tuple[dict[Hashable, list[torch.Tensor | None]], dict[Hashable, float]]:
    """Per selector, the keep masks of every layer of the full `cache` of `context_ids` (batch 1), and the
    seconds each would have taken alone.

    Selectors that need the reconstruction are scored by it (one run per chunk size); the others by their
    `prefill_scores` (per layer, recorded during the prefill).
    """
    scores = dict(prefill_scores)
    groups: dict[int, dict] = {}
    for key, selector in selectors.items():
        if selector.needs_reconstruction:
            if tokenizer is None:
                raise ValueError(f"{selector.name} needs the tokenizer to write its reconstruction prompt")
            base = innermost(selector)
            groups.setdefault(base.reconstruct_chunk, {})[key] = base
    seconds = dict.fromkeys(selectors, 0.0)
    for chunk, members in groups.items():
        inputs = reconstruction_inputs(tokenizer, context_ids, chunk=chunk, chat_template=chat_template)
        chunk_scores, chunk_seconds = reconstruct(model, cache, inputs, members)
        scores.update(chunk_scores)
        seconds.update(chunk_seconds)
    states = [LayerState.of_cached(layer, index, len(cache.layers)) for index, layer in enumerate(cache.layers)]
    masks = {}
    for key, selector in selectors.items():
        start = time.perf_counter()
        masks[key] = selector.select_layers(states, scores[key])
        seconds[key] += time.perf_counter() - start
    return masks, seconds

