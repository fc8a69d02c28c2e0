"""Streaming perplexity: a long text fed in chunks on a cache that eviction keeps bounded.

The paper's decoding setting (PG19-style, 4 sink tokens): the text is fed
`chunk` tokens at a time on one cache, under `obcache.Decoding(policy,
capacity=N, interval=chunk)`, so after every chunk each KV head is evicted back
to N tokens; the next-token log-likelihood of every token (after the first) is
recorded. With NLL_t = -log p(x_t | what the cache holds before x_t's chunk,
and x_<t of its chunk):

    perplexity = exp(mean_t NLL_t),   per position bucket b: exp(mean_{t in b} NLL_t)

The full cache (policy None) is the reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from obcache.cache import EvictableCache
from obcache.generation import forward_tokens
from obcache.hooks import attach
from obcache.policies import Selector


@dataclass
class Stream:
    """Per-token NLL of one streamed text, and the cache at the end."""

    nll: list[float]  # NLL of tokens 1..n-1 (nats)
    kept_tokens: float  # mean slots per KV head at the end
    cache_bytes: int
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.nll) / len(self.nll))

    def bucket_perplexities(self, size: int) -> list[float]:
        """Perplexity of the tokens in each run of `size` positions (the last bucket may be shorter)."""
        return [math.exp(sum(part) / len(part)) for part in (self.nll[i : i + size] for i in range(0, len(self.nll), size))]


@torch.no_grad()
def stream(model, ids: list[int], policy: Selector | None, *, chunk: int = 64) -> Stream:
    """Feed `ids` (batch 1) `chunk` tokens at a time on one cache under `policy`; the NLL of every next token."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    cache = EvictableCache(config=model.config)
    nll: list[float] = []
    last = None  # log-probs after the previous chunk's last token
    start = time.perf_counter()
    with attach(model, policy):
        for first in range(0, len(ids), chunk):
            part = ids[first : first + chunk]
            log_probs = torch.log_softmax(forward_tokens(model, cache, part, every_position=True).float(), dim=-1)
            targets = torch.tensor(part, device=log_probs.device)
            if last is not None:
                nll.append(-float(last[targets[0]]))
            nll.extend((-log_probs[:-1].gather(-1, targets[1:, None])[:, 0]).tolist())
            last = log_probs[-1]
    return Stream(nll, sum(cache.kept_tokens()) / len(cache.layers), cache.kv_nbytes(), time.perf_counter() - start)
