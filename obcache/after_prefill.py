"""The choice that waits for every layer: after the prefill, for selectors that `select_after_all_layers`.

GlobalKV pools every layer's scores, recorded as the prefill passed; KVzip
scores the context with the queries of extra forwards (`Selector.replay`: the
model repeating its context). Each extra forward runs on a scratch fork of the
prefill's cache (its own tokens are dropped with it); after every attention
layer, each replay scores the context from the forward's queries and attention
outputs, and the scores of all forwards are merged. Replays with the same
inputs share the forwards, and those that score alike share the scoring.

    masks, seconds = select_after_prefill(engine, cache, context_ids, {"a": selector}, {"a": prefill_scores})

Both the eviction (`obcache.eviction`) and the one-prefill fan-out (`obcache.fanout`) choose here.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
import torch

from obcache.cache import EvictableCache
from obcache.capture import Engine, Observer
from obcache.compat import cache_argument
from obcache.forward import ForwardRecord
from obcache.layer_state import LayerState
from obcache.selector import Replay, Selector


class _ReplayScorer(Observer):
    """Merges, per distinct scoring and layer, the context scores of every extra forward."""

    wants_log_normalizers = True  # the scores then need the context's keys only

    def __init__(self, replays: Mapping[Hashable, Replay], context_length: int, layers: int):
        self.context_length = context_length
        self.scorers = {replay.replay_scoring(): replay for replay in replays.values()}
        self.scores: dict[Hashable, list[torch.Tensor | None]] = {key: [None] * layers for key in self.scorers}
        self.seconds = dict.fromkeys(self.scorers, 0.0)

    def wants(self, record: ForwardRecord) -> bool:
        return not record.prefill

    def layer_done(self, state: LayerState, record: ForwardRecord) -> None:
        for key, replay in self.scorers.items():
            start = time.perf_counter()
            scores = replay.replay_scores(state, self.context_length)
            self.scores[key][state.layer_idx] = replay.merge(self.scores[key][state.layer_idx], scores)
            self.seconds[key] += time.perf_counter() - start


@torch.no_grad()
def replay_scores(engine: Engine, cache: EvictableCache, inputs: list[list[int]],
                  replays: Mapping[Hashable, Replay]) -> tuple[dict[Hashable, list[torch.Tensor]], dict[Hashable, float]]:
    """Per replay, per layer, the [1, Hkv, L] scores of the L context tokens of `cache` over the extra forwards of
    `inputs` (merged over them); and per replay the seconds it would have taken alone (the forwards plus its own
    scoring). Runs inside `engine` (the model attached)."""
    model = engine.model
    scorer = _ReplayScorer(replays, cache.seen_tokens, len(cache.layers))
    start = time.perf_counter()
    with engine.observing(scorer):
        for ids in inputs:
            scratch = cache.fork()  # shares the context's slots; the forward's own are dropped with it
            model(input_ids=torch.tensor([ids], device=model.device), **cache_argument(model, scratch), use_cache=True,
                  position_ids=scratch.positions_for(len(ids), model.device), logits_to_keep=1)
    forwards = time.perf_counter() - start - sum(scorer.seconds.values())
    scores = {key: scorer.scores[replay.replay_scoring()] for key, replay in replays.items()}
    return scores, {key: forwards + scorer.seconds[replay.replay_scoring()] for key, replay in replays.items()}


def select_after_prefill(
    engine: Engine, cache: EvictableCache, context_ids: list[int], selectors: Mapping[Hashable, Selector],
    prefill_scores: Mapping[Hashable, list[torch.Tensor]],
) -> tuple[dict[Hashable, list[torch.Tensor | None]], dict[Hashable, float]]:
    """Per selector, the keep masks of every layer of the full `cache` of `context_ids` (batch 1), and the
    seconds each would have taken alone.

    Selectors with a `replay` are scored by its extra forwards (selectors whose replays write the same inputs
    share them); the others by their `prefill_scores` (per layer, recorded during the prefill).
    """
    scores = dict(prefill_scores)
    groups: dict[tuple, dict] = {}
    for key, selector in selectors.items():
        replay = selector.replay()
        if replay is not None:
            if engine.tokenizer is None:
                raise ValueError(f"{selector.name} needs the tokenizer to write its prompt: attach(model, policy, "
                                 "tokenizer=tokenizer)")
            inputs = replay.replay_inputs(engine.tokenizer, context_ids, chat_template=engine.chat_template)
            groups.setdefault(tuple(map(tuple, inputs)), {})[key] = replay
    seconds = dict.fromkeys(selectors, 0.0)
    for inputs, members in groups.items():
        group_scores, group_seconds = replay_scores(engine, cache, [list(ids) for ids in inputs], members)
        scores.update(group_scores)
        seconds.update(group_seconds)
    states = [LayerState.of_cached(layer, index, len(cache.layers)) for index, layer in enumerate(cache.layers)]
    masks = {}
    for key, selector in selectors.items():
        start = time.perf_counter()
        masks[key] = selector.select_layers(states, scores[key])
        seconds[key] += time.perf_counter() - start
    return masks, seconds
