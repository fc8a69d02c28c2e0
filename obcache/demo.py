"""The main job: a needle question under several policies, then a long generation on a bounded cache.

1. One RULER-style needle question (7-digit value) about a 2048-token context,
   answered with the full cache, StreamingLLM, the paper's SnapKV, and the
   chosen policy (default: the recommended one) with every score. One prefill
   serves every row (the evaluation's fan-out); each answer is decoded on its
   own evicted cache.
2. A long answer about the same context, generated on the full cache and with
   eviction during decoding (`obcache.Decoding`): the cache stays at the decode
   budget however long the output.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from obcache.evaluation.tasks import exact_match, make_sample, score_prediction
from obcache.fanout import shared_prefill
from obcache.generation import build_prompt, continue_greedy, eos_token_ids, generate
from obcache.hooks import attach
from obcache.loading import load_model
from obcache.policies import Decoding, Selector, SnapKV, StreamingLLM, policy_label
from obcache.scores import SCORE_KINDS

OBCACHE_SCORES = ("attention", "obc-value", "obc-key", "obc-joint")
LONG_QUESTION = "Retell the text above in detail, paragraph by paragraph."


def demo_policies(chosen: dict[str, Selector], budget: float | int) -> dict[str, Selector | None]:
    """Full cache, StreamingLLM, the paper's SnapKV (attention, obc-joint), and the chosen policy per score."""
    rows: dict[str, Selector | None] = {"full cache": None, "streamingllm": StreamingLLM(budget=budget)}
    for score in ("attention", "obc-joint"):
        rows[f"snapkv (paper) + {score}"] = SnapKV(budget=budget, score=score)
    for score, policy in chosen.items():
        rows[f"{policy_label(policy)} + {score}"] = policy
    return rows


def run_demo(
    chosen: dict[str, Selector],
    *,
    model_name: str | None = None,
    length: int = 2048,
    budget: float | int = 0.2,
    query_aware: bool = True,
    decode_policy: Selector | None = None,
    long_tokens: int = 384,
    device: str | None = None,
    dtype: str | None = None,
    attn_implementation: str = "sdpa",
) -> list[dict]:
    """Print and return the needle table, then (with `decode_policy`) the long-generation table."""
    policies = demo_policies(chosen, budget)  # built and validated before anything loads
    model, tokenizer = load_model(model_name, device=device, dtype=dtype, attn_implementation=attn_implementation)
    sample = make_sample("niah_single_number", tokenizer, length, seed=0, depth=0.5)
    mode = "query-aware (question inside the compressed prompt)" if query_aware else "query-agnostic"
    print(f"1. needle at depth 0.5 of a {length}-token context; expected {sample.expected[0]}; "
          f"budget {budget!r} kept per KV head; {mode}")
    context_ids, question_ids = build_prompt(tokenizer, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    prefill_ids = context_ids + question_ids if query_aware else context_ids
    start = time.perf_counter()
    shared = shared_prefill(model, prefill_ids, policies, tokenizer=tokenizer)
    print(f"   one prefill of {len(prefill_ids)} tokens for all rows: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    rows = []
    for label in tqdm(policies, desc="answers", file=sys.stderr):
        cache = shared.evicted(label)
        start = time.perf_counter()
        with attach(model):
            tokens = continue_greedy(model, cache, shared.logits, [] if query_aware else question_ids,
                                     eos=eos_token_ids(model, tokenizer), max_new_tokens=16)
        answer = tokenizer.decode(tokens, skip_special_tokens=True)
        rows.append({
            "policy": label, "answer": answer.strip().replace("\n", " ")[:24],
            "contains": score_prediction(sample, answer) == 1.0,
            "exact": exact_match(sample.task, sample.expected, answer) == 1.0, "kept": cache.kept_tokens()[0],
            "seen": cache.get_seq_length(), "cache_mib": cache.nbytes() / 2**20,
            "seconds": time.perf_counter() - start,
        })
    print(format_table(rows))
    if decode_policy is not None:
        print(f"\n2. a long answer ({long_tokens} new tokens) about the same context, full cache vs eviction "
              f"during decoding: {policy_label(decode_policy)}, decode capacity {decode_policy.capacity} tokens per KV head")
        lines, width = [], max(len("full cache"), len(policy_label(decode_policy)))
        for label, policy in (("full cache", None), (policy_label(decode_policy), decode_policy)):
            result = generate(model, tokenizer, sample.context, LONG_QUESTION, policy=policy, query_aware=True,
                              max_new_tokens=long_tokens)
            cache = result.cache
            lines.append(f"| {label:{width}s} | {len(result.token_ids):6d} | {cache.get_seq_length():5d} | "
                         f"{sum(cache.kept_tokens()) / len(cache.layers):8.0f} | {cache.nbytes() / 2**20:9.2f} | "
                         f"{len(result.token_ids) / result.decode_seconds:5.1f} | {result.text.strip()[:40]!r}")
        print(f"| {'policy':{width}s} | tokens | seen  | kept/head | cache MiB | tok/s | answer starts")
        print("|" + "-" * (width + 2) + "|--------|-------|----------|-----------|-------|---")
        print("\n".join(lines))
    return rows


def format_table(rows: list[dict]) -> str:
    """The needle table: 'contains' is RULER's string match, 'exact' asks that the answer's first number be the needle."""
    width = max(len("policy"), *(len(row["policy"]) for row in rows))
    header = f"| {'policy':{width}s} | {'answer':24s} | contains | exact | kept/seen | cache MiB | decode s |"
    lines = [header, "|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|"]
    for row in rows:
        lines.append(
            f"| {row['policy']:{width}s} | {row['answer']:24s} | {'yes' if row['contains'] else 'no':8s} | "
            f"{'yes' if row['exact'] else 'no':5s} | {row['kept']:>4.0f}/{row['seen']:<4d} | {row['cache_mib']:9.2f} | "
            f"{row['seconds']:8.2f} |"
        )
    return "\n".join(lines)


def chosen_policies(make: callable) -> dict[str, Selector]:
    """The chosen policy with each OBCache score (and attention): `make(score)` builds one."""
    return {score: make(score) for score in OBCACHE_SCORES if score in SCORE_KINDS}
