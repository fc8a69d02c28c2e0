"""The timed measurements: eviction through the library's own hooks, scoring, decode, H2O full history.

One prefill under the fan-out's `MaskRecorder` (an observer that evicts
nothing) serves every policy: at each layer it times each policy's
scoring and `select` on the state the hooks hand over, and keeps the masks;
after the prefill, `cache.subset(masks)` (the library's `EvictableCache.keep`
on every layer) builds and times each policy's evicted cache.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from torch import nn
from transformers import DynamicCache

from obcache.bench.shapes import forward
from obcache.cache import EvictableCache
from obcache.capture import Observer
from obcache.fanout import MaskRecorder
from obcache.forward import ForwardRecord
from obcache.hooks import attach
from obcache.layer_state import LayerState
from obcache.policies import H2O, Selector
from obcache.scores import SCORE_KINDS, saliency

T = TypeVar("T")
#: Makes a fresh cache and the context to decode it in.
DecodeConfig = Callable[[], tuple[object, AbstractContextManager]]
#: Scores measured again with the attention outputs recomputed (the path without capture).
RECOMPUTED = ("obc-key", "obc-joint", "exact-removal")



def slot_bytes(layer) -> int:
    """Bytes of one slot's key and value in a float layer (uniform: tensors; paged: its pool's FloatStore)."""
    dim = layer.keys.shape[-1] if layer.uniform else layer.keys.dim
    return 2 * dim * layer.dtype.itemsize


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """(fn(), seconds), synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def oversubscription(device: torch.device, reps: int = 30) -> float | None:
    """Median time of a small matmul on all torch threads / on one thread (CPU with > 1 thread, else None).

    About 1 on an idle machine; far above 1 when other processes hold the
    cores, because every parallel op then waits for its threads' time slices
    (small ops suffer most: eviction steps, decode-time cache updates).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        return None
    x, w = torch.randn(16, 576), torch.randn(576, 576)
    many = statistics.median(timed(partial(torch.matmul, x, w), device)[1] for _ in range(reps))
    torch.set_num_threads(1)
    one = statistics.median(timed(partial(torch.matmul, x, w), device)[1] for _ in range(reps))
    torch.set_num_threads(threads)
    return many / one


class Window(NamedTuple):
    """What scoring one layer needs: window queries [B, Hq, W, d], their captured outputs, keys, values."""

    queries: torch.Tensor
    outputs: torch.Tensor | None
    keys: torch.Tensor
    values: torch.Tensor
    scaling: float


class Windows(Observer):
    """At the prefill: each layer's last `window` queries and outputs (`windows`), and the whole state of layer
    `full_layer` (`full_state`, for H2O full history)."""

    def __init__(self, window: int, full_layer: int):
        self.window, self.full_layer = window, full_layer
        self.windows: dict[int, Window] = {}
        self.full_state: LayerState | None = None

    def wants(self, record: ForwardRecord) -> bool:
        return record.prefill

    def layer_done(self, state: LayerState, record: ForwardRecord) -> None:
        queries, outputs = state.window(state.length - self.window, state.length)
        self.windows[state.layer_idx] = Window(queries, outputs, state.keys, state.values, state.scaling)
        if state.layer_idx == self.full_layer:
            self.full_state = state


class Recorded(NamedTuple):
    """What one recorded prefill gives the benchmark: the masks and select seconds per policy, the windows."""

    masks: dict[str, list[torch.Tensor | None]]
    select_seconds: dict[str, float]
    windows: dict[int, Window]
    full_state: LayerState | None


@torch.no_grad()
def recorded_prefill(
    model: nn.Module, ids: torch.Tensor, policies: Mapping[str, Selector], window: int
) -> tuple[Recorded, EvictableCache]:
    """One prefill of `ids` on a full `EvictableCache`, every policy's choice recorded (full-history layer: the
    middle one)."""
    engine = attach(model)
    masks = MaskRecorder({key: policy.prepare(model) for key, policy in policies.items()}, len(engine.attentions))
    windows = Windows(window, full_layer=len(engine.attentions) // 2)
    cache = EvictableCache()
    with engine, engine.observing(windows), engine.observing(masks):
        forward(model, cache, ids)
    return Recorded(masks.masks, masks.seconds, windows.windows, windows.full_state), cache


def measure_eviction(
    recorder: Recorded, cache: EvictableCache, device: torch.device, keys: list[str]
) -> dict[str, dict[str, float]]:
    """Per policy key, seconds over all layers of `select` (in the hooks) and of `keep` (`cache.subset`)."""
    seconds = {}
    for key in keys:
        _, keep = timed(partial(cache.subset, recorder.masks[key]), device)
        seconds[key] = {"select": recorder.select_seconds[key], "keep": keep}
    return seconds


@torch.no_grad()
def plain_prefill(model: nn.Module, ids: torch.Tensor, device: torch.device) -> tuple[DynamicCache, float]:
    """The model's own prefill, without obcache: its cache and seconds."""
    cache = DynamicCache(config=model.config)
    return cache, timed(partial(forward, model, cache, ids), device)[1]


@torch.no_grad()
def hooked_prefill(model: nn.Module, ids: torch.Tensor, policy: Selector, device: torch.device) -> dict:
    """A prefill under `policy.attach(model)`: seconds end to end, the eviction inside it, the cache left."""
    cache = EvictableCache()
    with policy.attach(model):
        seconds = timed(partial(forward, model, cache, ids), device)[1]
    return {"seconds": seconds, "eviction_seconds": cache.eviction_seconds, "cache_bytes": cache.kv_nbytes(),
            "index_bytes": cache.index_nbytes(), "full_bytes": cache.full_bytes}


def cache_entry(cache: EvictableCache, fraction: float | None) -> dict:
    """Bytes held and kept tokens of a cache; with `fraction` (kept), the bytes expected: fraction x full."""
    heads = torch.stack([cache.head_lengths(i) for i in range(len(cache.layers))])  # [layers, B, Hkv]
    first = cache.layers[0]
    entry = {
        "cache_bytes": cache.kv_nbytes(), "index_bytes": cache.index_nbytes(), "kv_heads": heads.shape[-1],
        "head_tokens": [int(heads.min()), int(heads.max())], "layout": "ragged" if cache.is_ragged(0) else "uniform",
        "kept_shape": None if cache.is_ragged(0) else list(first.keys.shape),
    }
    if fraction is not None:
        entry["full_bytes"] = cache.full_bytes
        entry["expected_bytes"] = fraction * cache.full_bytes
        entry["bytes_error"] = entry["cache_bytes"] / entry["expected_bytes"] - 1
    return entry


def decode_configs(model: nn.Module, full: DynamicCache, cache: EvictableCache,
                   masks: Mapping[str, list[torch.Tensor | None]]) -> dict[str, DecodeConfig]:
    """What `measure_decode` runs: the model's own full cache, the full cache under `obcache.attach`, each masked cache."""
    configs = {"full": lambda: (copy.deepcopy(full), nullcontext()),
               "full attached": lambda: (cache.subset([None] * len(cache.layers)), attach(model))}
    for key, layer_masks in masks.items():
        configs[key] = partial(lambda m: (cache.subset(m), attach(model)), layer_masks)
    return configs


@torch.no_grad()
def measure_decode(
    model: nn.Module, token: torch.Tensor, configs: Mapping[str, DecodeConfig], new_tokens: int, device: torch.device,
    rounds: int = 3,
) -> dict[str, float]:
    """Best tokens/s of `new_tokens` greedy steps after one warm-up step, per configuration.

    Each round decodes every configuration on a fresh cache (`configs[key]()`
    gives the cache and the context to decode in); rounds are interleaved.
    """
    best = dict.fromkeys(configs, 0.0)
    for _ in range(rounds):
        for key, make in configs.items():
            cache, context = make()
            with context:
                forward(model, cache, token)

                def steps(current=token):
                    for _ in range(new_tokens):
                        current = forward(model, cache, current).argmax(-1, keepdim=True)

                best[key] = max(best[key], new_tokens / timed(steps, device)[1])
            del cache
    return best


def measure_scoring(windows: Mapping[int, Window], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per layer of `saliency` alone, per score kind (window queries precomputed).

    `<kind>` uses the outputs captured from the forward (what the hooks do);
    `<kind> (recomputed o)` recomputes them; `q.k product alone` is the one
    W x L x d product every score needs (the floor).
    """
    times: dict[str, list[float]] = {}
    variants = [(kind, True) for kind in SCORE_KINDS] + [(kind, False) for kind in RECOMPUTED]
    with torch.no_grad():
        for _ in range(repeats):
            for w in windows.values():
                grouped = w.queries.float().reshape(w.keys.shape[0], w.keys.shape[1], -1, w.queries.shape[-1])
                product = partial(torch.matmul, grouped, w.keys.float().mT)
                times.setdefault("q.k product alone", []).append(timed(product, device)[1])
                for kind, captured in variants:
                    score = partial(saliency, w.queries, w.keys, w.values, kind, scaling=w.scaling,
                                    outputs=w.outputs if captured else None)
                    times.setdefault(kind if captured else f"{kind} (recomputed o)", []).append(timed(score, device)[1])
    return {label: statistics.median(values) for label, values in times.items()}


def measure_full_history(state: LayerState, cache_bytes: int, score: str, device: torch.device) -> dict:
    """H2O full-history scores of one recorded layer: seconds and extra peak memory vs the whole KV cache."""
    policy = H2O(budget=0.1, score=score, full_history=True)
    with torch.no_grad():
        if device.type == "cuda":
            sync(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(partial(policy.token_scores, state), device)[1]
            extra, largest = torch.cuda.max_memory_allocated(device) - base, None
        else:
            extra, largest, seconds = cpu_peak(partial(policy.token_scores, state))
    length, heads = state.length, state.query_heads
    return {
        "layer": state.layer_idx, "score": score, "seconds": seconds, "extra_peak_bytes": extra,
        "largest_allocation": largest, "cache_bytes": cache_bytes, "l_by_l_bytes": heads * length * length * 4,
        "chunk_rows": max(1, policy.chunk_elements // (heads * length)),
    }


def cpu_peak(fn: Callable[[], object]) -> tuple[int, int, float]:
    """(peak bytes allocated above the start, largest single allocation, seconds) of `fn()`, via the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    events.sort(key=lambda e: e["ts"])
    current = peak = largest = 0
    for event in events:
        current += event["args"]["Bytes"]
        peak = max(peak, current)
        largest = max(largest, event["args"]["Bytes"])
    return peak, largest, seconds
