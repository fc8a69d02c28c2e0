"""Eviction under tensor parallelism on a real model: every rank answers a needle question with its share of
the KV heads, and must give one device's tokens, with each of its heads holding what that head holds there.

    torchrun --nproc-per-node 3 scripts/tensor_parallel_check.py                      # SmolLM2: 3 KV heads
    torchrun --nproc-per-node 2 scripts/tensor_parallel_check.py --model qwen2.5-coder-0.5b-instruct

CPU (gloo) or CUDA (nccl, one GPU per rank). Rank 0 prints one row per policy and exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import obcache
from obcache.evaluation.tasks import make_sample


def policies(budget: float, group) -> dict:
    """name -> (selector, query_aware): the recommended policy and every mode that chooses across heads."""
    return {
        "recommended (adakv)": (obcache.recommended(budget=budget, score="obc-key", group=group), True),
        "snapkv shared, spans": (obcache.SnapKV(budget=budget, score="obc-joint", selection="shared", chunk=8,
                                                group=group), True),
        "kvzip-heads": (obcache.KVzipHeads(score="attention", budget=budget, group=group), False),
        "decoding(adakv(h2o))": (obcache.Decoding(obcache.AdaKV(obcache.H2O(budget=budget, score="obc-value", sinks=4,
                                                                            group=group)), capacity=256, interval=16),
                                 True),
    }


def run(model, tokenizer, sample, selector, query_aware: bool, new_tokens: int):
    selector = obcache.calibrate(model, tokenizer, selector)
    result = obcache.generate(model, tokenizer, sample.context, sample.question, policy=selector,
                              query_aware=query_aware, max_new_tokens=new_tokens, answer_prefix=sample.answer_prefix)
    kept = [result.cache.kept_positions(layer) for layer in range(len(result.cache.layers))]
    return result, kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a built-in alias or local folder (default: SmolLM2-135M)")
    parser.add_argument("--length", type=int, default=2048, help="context tokens")
    parser.add_argument("--budget", type=float, default=0.2, help="fraction of the prompt kept")
    parser.add_argument("--new-tokens", type=int, default=300, help="tokens generated (long: decode-time eviction)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    full, tokenizer = obcache.load_model(args.model)
    split, _ = obcache.load_model(args.model, tp_size=world)
    group = obcache.tensor_parallel_group(split)
    sample = make_sample("niah_single_number", tokenizer, args.length, seed=0)
    rows, failed = [], False
    for name in policies(args.budget, None):
        one, one_kept = run(full, tokenizer, sample, *policies(args.budget, None)[name], args.new_tokens)
        mine, mine_kept = run(split, tokenizer, sample, *policies(args.budget, group)[name], args.new_tokens)
        heads = len(mine_kept[0][0])
        same_heads = all(torch.equal(positions, full_row[rank * heads + head])
                         for layer_mine, layer_full in zip(mine_kept, one_kept)
                         for row_mine, full_row in zip(layer_mine, layer_full)
                         for head, positions in enumerate(row_mine))
        same_tokens = mine.token_ids == one.token_ids
        bytes_by_rank = [None] * world
        dist.all_gather_object(bytes_by_rank, (mine.cache.nbytes(), same_heads))
        failed |= not (same_tokens and all(ok for _, ok in bytes_by_rank))
        rows.append((name, same_tokens, all(ok for _, ok in bytes_by_rank), one.cache.nbytes(),
                     [b for b, _ in bytes_by_rank], one.text.strip()[:24]))
    if rank == 0:
        print(f"{world} ranks, {args.length}-token needle, budget {args.budget}, {args.new_tokens} new tokens")
        print("| policy | same tokens | same heads | one device KiB | per rank KiB | answer |")
        print("|---|---|---|---:|---|---|")
        for name, tokens, heads, one_bytes, per_rank, text in rows:
            ranks = " + ".join(f"{b / 1024:.0f}" for b in per_rank)
            print(f"| {name} | {tokens} | {heads} | {one_bytes / 1024:.0f} | {ranks} | {text!r} |")
    dist.destroy_process_group()
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
