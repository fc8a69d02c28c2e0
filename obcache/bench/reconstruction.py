"""Context-reconstruction cost (`obcache bench --reconstruction`): KVzip's compression as a ratio of a plain prefill.

On a real needle context of each length (the reconstruction prompt is text),
interleaved rounds time, each from an empty cache:

- `plain`: the model's own prefill (its DynamicCache);
- each KVzip configuration: the prefill under `policy.attach(model, tokenizer=...)`,
  which includes the reconstruction (or, for `KVzipReplay`, the moved-query
  scoring), the choice over all layers and the eviction: what a user waits for.
  The head-level variant's one-off rating (once per model, `prepare`) is timed
  apart and reported as `calibration_seconds`.

Each configuration's seconds are the best round's; the report prints their
ratios to `plain` side by side, against the targets: the full
reconstruction at most 2x the plain prefill, the cheaper (head-level)
variant at most 1.3x; the replay variant is printed for comparison.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers import DynamicCache

from obcache.bench.measure import sync
from obcache.compat import cache_argument
from obcache.cache import EvictableCache
from obcache.generation import build_prompt, forward_tokens
from obcache.policies import KVzip, KVzipHeads, KVzipReplay, Selector, policy_label


def reconstruction_policies(score: str, budget: float | int) -> dict[str, Selector]:
    """The KVzip variants the benchmark times, each with the paper's global allocation: the full reconstruction,
    the cheaper head-level variant (the target's), and the prefill replay (for comparison)."""
    return {"full": KVzip(score=score, budget=budget), "cheap": KVzipHeads(score=score, budget=budget),
            "replay": KVzipReplay(score=score, budget=budget, stride=4)}


@torch.no_grad()
def measure_reconstruction(model: nn.Module, tokenizer, lengths: list[int], policies: dict, rounds: int,
                           device: torch.device) -> dict:
    """Best-of-`rounds` seconds of a plain prefill and of each policy's compressing prefill, per length."""
    from obcache.evaluation.tasks import make_sample

    entry = {"policies": {key: policy_label(p) for key, p in policies.items()}, "rounds": rounds, "lengths": [],
             "calibration_seconds": {}}
    prepared = {}
    for key, policy in policies.items():  # the one-off preparation (head ratings), timed apart
        start = time.perf_counter()
        prepared[key] = policy.prepare(model, tokenizer)
        if prepared[key] is not policy:
            entry["calibration_seconds"][key] = time.perf_counter() - start
    policies = prepared
    for length in lengths:
        sample = make_sample("niah_single_number", tokenizer, length, seed=0, depth=0.5)
        ids, _ = build_prompt(tokenizer, sample.context, sample.question)
        runs = {"plain": lambda: model(input_ids=torch.tensor([ids], device=device), **cache_argument(model, DynamicCache()),
                                       use_cache=True, logits_to_keep=1)}
        for key, policy in policies.items():
            def compress(policy=policy):
                with policy.attach(model, tokenizer=tokenizer):
                    forward_tokens(model, EvictableCache(config=model.config), ids)
            runs[key] = compress
        seconds = {key: [] for key in runs}
        for _ in range(rounds + 1):  # the first round warms up, untimed
            for key, run in runs.items():
                sync(device)
                start = time.perf_counter()
                run()
                sync(device)
                seconds[key].append(time.perf_counter() - start)
        entry["lengths"].append({"length": len(ids), "seconds": {key: min(s[1:]) for key, s in seconds.items()}})
    return entry


def format_reconstruction(entry: dict) -> list[str]:
    """The section of the printed report: seconds and ratio to the plain prefill, per length."""
    keys = ["plain", *entry["policies"]]
    lines = [f"context reconstruction (KVzip): compressing prefill vs plain prefill, best of {entry['rounds']} rounds; "
             + "; ".join(f"{key} = {label}" for key, label in entry["policies"].items()), "",
             "| tokens | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in entry["lengths"]:
        plain = row["seconds"]["plain"]
        cells = [f"{row['seconds'][key]:.2f} s ({row['seconds'][key] / plain:.2f}x)" for key in keys]
        lines.append(f"| {row['length']} | " + " | ".join(cells) + " |")
    for key, seconds in entry.get("calibration_seconds", {}).items():
        lines.append(f"\n{key}: rating the heads took {seconds:.2f} s, once per model (not in the ratios)")
    return lines
