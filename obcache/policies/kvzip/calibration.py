"""Head ratings for `KVzipHeads`: fitted once per model, tied to the model they were fitted on.

The model reads a calibration text (`calibration` tokens of the shipped
Jargon File) and repeats it, teacher-forced (KVzip's reconstruction). A KV
head's rating is the mean over the text's tokens, sinks aside, of the
reconstruction score (the policy's `score`, `gqa` and `aggregate`): heads
that look far back to copy the context rate high, heads that watch the sinks
and their own recent tokens rate near zero. The ratings carry the model's
fingerprint (`obcache.models.fingerprint`): attached to another model, the
policy fits them again (or refuses, without a tokenizer). Fits are kept per
model and setting, so a model is rated once per process.

    policy = obcache.calibrate(model, tokenizer, KVzipHeads(budget=0.5))   # the policy, rated on this model
"""

from __future__ import annotations

import time
from dataclasses import dataclass
import torch
from torch import nn

from obcache.after_prefill import replay_scores
from obcache.cache import EvictableCache
from obcache.compat import cache_argument
from obcache.hooks import attach
from obcache.selector import Replay, Selector
from obcache.text import document_ids


@dataclass(frozen=True)
class HeadRatings:
    """[layers, Hkv] float32 ratings of a model's KV heads (this rank's under tensor parallelism), fitted on the
    model whose fingerprint is `model`, in `seconds`."""

    scores: torch.Tensor
    model: str
    seconds: float


_FITTED: dict[tuple, HeadRatings] = {}


@torch.no_grad()
def fit_head_ratings(model: nn.Module, tokenizer, probe: Replay, *, calibration: int, sinks: int, identity: str,
                     chat_template: bool = True) -> HeadRatings:
    """Ratings of `model`'s heads by `probe`'s reconstruction scores over `calibration` tokens of the shipped text,
    the first `sinks` left out (module docstring); `identity` is the model's fingerprint. Reuses an earlier fit of
    the same model and setting."""
    key = (identity, repr(probe), calibration, sinks, chat_template, tokenizer.name_or_path)
    if key not in _FITTED:
        start = time.perf_counter()
        ids = document_ids(tokenizer, calibration)
        with attach(model, tokenizer=tokenizer, chat_template=chat_template) as engine:
            cache = EvictableCache(config=model.config)
            model(input_ids=torch.tensor([ids], device=model.device), **cache_argument(model, cache), use_cache=True,
                  logits_to_keep=1)
            inputs = probe.replay_inputs(tokenizer, ids, chat_template=chat_template)
            layers = replay_scores(engine, cache, inputs, {0: probe})[0][0]
        scores = torch.stack([layer[0, :, sinks:].float().mean(-1) for layer in layers]).cpu()
        _FITTED[key] = HeadRatings(scores, identity, time.perf_counter() - start)
    return _FITTED[key]


def calibrate(model: nn.Module, tokenizer, selector: Selector, *, chat_template: bool = True) -> Selector:
    """`selector` made ready for `model` (`Selector.prepare`): for head-level KVzip, its heads rated on this model
    (once per model and setting); any other selector comes back as it is. `attach` does this itself."""
    return selector.prepare(model, tokenizer, chat_template=chat_template)
