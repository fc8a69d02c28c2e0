"""Eviction as an observer: a selector's keep masks applied to the cache as the forwards pass.

- after each layer of the prefill: `select(layer)`, and the layer shrinks at
  once, so the full caches of all layers never coexist with scoring
  temporaries;
- selectors that choose after all layers (`GlobalKV`, KVzip): each layer's
  token scores are recorded (unless a replay scores them), and after the
  prefill's last layer `select_after_prefill` chooses for every layer;
- after each later forward, for selectors that evict while decoding
  (`Decoding`): `decode_step(layer, queries, outputs)` for every layer, and
  `decode_select(layer)` where it asks (the layer's state is built only then).
"""

from __future__ import annotations

import time
import torch

from obcache.after_prefill import select_after_prefill
from obcache.capture import Engine, Observer
from obcache.forward import ForwardRecord
from obcache.layer_state import LayerState
from obcache.selector import Selector


class Evictor(Observer):
    """Evicts with `selector`; its time goes to the cache's `eviction_seconds`."""

    def __init__(self, selector: Selector):
        self.selector = selector
        self._scores: list[torch.Tensor] = []  # per layer of the prefill, for the choice after all layers

    def before_prefill(self, prompt_lengths: list[int], record: ForwardRecord) -> None:
        self.selector.check_prompt(prompt_lengths)
        if self.selector.replay() is not None and record.input_ids is None:
            raise ValueError(f"{self.selector.name} repeats the context from its token ids: pass input_ids")
        self._scores = []

    def wants(self, record: ForwardRecord) -> bool:
        return record.prefill or self.selector.evicts_while_decoding

    def layer_passed(self, record: ForwardRecord, layer_idx: int) -> bool:
        if record.prefill:
            return True
        queries = record.queries.get(layer_idx)  # recorded by obcache's attention function, always
        if queries is None:
            raise RuntimeError(f"layer {layer_idx} ran without obcache's attention function: evict while "
                               "decoding under `policy.attach(model)` only")
        start = time.perf_counter()
        outputs = record.outputs.get(layer_idx)  # [B, q, Hq * dv] at the output projection, if it has one
        due = self.selector.decode_step(record.cache.layers[layer_idx], queries, outputs)
        record.cache.eviction_seconds += time.perf_counter() - start
        return due

    def layer_done(self, state: LayerState, record: ForwardRecord) -> None:
        start = time.perf_counter()
        if record.prefill and self.selector.selects_after_all_layers:  # chosen after the last layer
            if self.selector.replay() is None:
                self._scores.append(self.selector.token_scores(state))
        else:
            mask = self.selector.select(state) if record.prefill else self.selector.decode_select(state)
            # None: keeps all (the layer is recorded as visited)
            record.cache.keep(state.layer_idx, mask, self.selector.decode_room)
        record.cache.eviction_seconds += time.perf_counter() - start

    def forward_done(self, record: ForwardRecord, engine: Engine) -> None:
        if not (record.prefill and self.selector.selects_after_all_layers):
            return
        start = time.perf_counter()
        ids = record.input_ids[0].tolist() if record.input_ids is not None else []
        masks = select_after_prefill(engine, record.cache, ids, {0: self.selector}, {0: self._scores})[0][0]
        self._scores = []
        for layer_idx, mask in enumerate(masks):
            record.cache.keep(layer_idx, mask)
        record.cache.eviction_seconds += time.perf_counter() - start
