#!/usr/bin/env python
"""Decode speed and bytes of eviction with precision (issue 20), side by side in one run.

On the default model, for each context length: the recommended policy alone, `Quantized(policy, bits=4)`, the
recommended policy at twice the budget and `MixedPrecision` around it (`--byte-budget`), each prefilled on the
same needle prompt, then decoded greedily, interleaved round by round (median step time). Prints tok/s, the
ratio to the same policy unquantized, and the bytes held right after the prompt's compression against the full
16-bit cache and the byte budget: the keys and values (`cache.kv_nbytes()`, float elements counted at 16 bits:
what the byte budget counts) and, apart, the slot index (`cache.index_nbytes()`; `cache.nbytes()` is both):

    flock /tmp/obcache-cpu.lock python benchmarks/precision.py --lengths 4096 8192
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import obcache  # noqa: E402
from obcache.evaluation.families import byte_fields  # noqa: E402
from obcache.evaluation.tasks import make_sample  # noqa: E402
from obcache.generation import build_prompt  # noqa: E402


def configurations(budget: float, byte_budget: float) -> dict:
    """name -> (policy, the name of the same policy unquantized)."""
    base, cap = obcache.recommended(budget=budget), obcache.recommended(budget=2 * budget)
    return {"evict": (base, "evict"), "quantized-4": (obcache.Quantized(base, bits=4), "evict"),
            f"evict {2 * budget:g}": (cap, f"evict {2 * budget:g}"),
            "mixed": (obcache.MixedPrecision(cap, byte_budget=byte_budget), f"evict {2 * budget:g}")}


@torch.no_grad()
def decode(model, policy, ids: list[int], steps: int) -> tuple[float, dict]:
    """(seconds per step of `steps` greedy steps after a warm-up, the bytes held right after the prompt's
    compression: `byte_fields`, float elements counted at 16 bits)."""
    cache = obcache.EvictableCache()
    with policy.attach(model):
        out = model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1)
        held = byte_fields(cache, model, len(ids))
        token, times = out.logits[:, -1:].argmax(-1), []
        for _ in range(steps + 4):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache)
            times.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
    return statistics.median(times[4:]), held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--budget", type=float, default=0.1, help="tokens kept by the policy (default 0.1)")
    parser.add_argument("--byte-budget", type=float, default=0.05, help="MixedPrecision's bytes (default 0.05)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = obcache.load_model()
    print(f"torch threads {args.threads}; budget {args.budget}, MixedPrecision byte budget {args.byte_budget} "
          f"(cap {2 * args.budget}); {args.steps} steps x {args.rounds} rounds (interleaved), median step")
    print("| tokens | configuration | tok/s | x the same policy unquantized | bytes held / full 16-bit bytes "
          "(index) | byte budget | held / budget |")
    print("|---|---|---|---|---|---|---|")
    for length in args.lengths:
        sample = make_sample("niah_single_number", tokenizer, length, seed=0, depth=0.5)
        context, question = build_prompt(tokenizer, sample.context, sample.question)
        ids = context + question
        configs = configurations(args.budget, args.byte_budget)
        seconds: dict[str, list[float]] = {key: [] for key in configs}
        held = {}
        for _ in range(args.rounds):
            for key, (policy, _) in configs.items():
                step, held[key] = decode(model, policy, ids, args.steps)
                seconds[key].append(step)
        for key, (_, plain) in configs.items():
            median, base = statistics.median(seconds[key]), statistics.median(seconds[plain])
            fraction = held[key]["cache_bytes_16"] / held[key]["full_bytes_16"]
            index = held[key]["index_bytes"] / held[key]["full_bytes_16"]
            budget = args.byte_budget if key == "mixed" else None
            versus = f"{fraction / budget:.4f}" if budget else "-"
            print(f"| {len(ids)} | {key} | {1 / median:.1f} | {base / median:.2f}x | {fraction:.4f} ({index:.4f}) | "
                  f"{budget if budget else '-'} | {versus} |")


if __name__ == "__main__":
    main()
