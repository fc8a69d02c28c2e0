"""The main job: one needle-in-a-haystack question, full cache vs policies x scores."""

from __future__ import annotations

import sys

from tqdm import tqdm

from obcache.evaluation.tasks import make_sample, score_prediction
from obcache.generation import generate
from obcache.loading import load_model
from obcache.policies import H2O, TOVA, Policy, SnapKV, StreamingLLM


def demo_policies(budget: float | int) -> list[tuple[str, Policy | None]]:
    """Full cache, StreamingLLM, and H2O / TOVA / SnapKV each with the attention and obc-joint scores."""
    pairs: list[tuple[str, Policy | None]] = [("full cache", None), ("streamingllm", StreamingLLM(budget=budget))]
    for policy_class in (H2O, TOVA, SnapKV):
        for score in ("attention", "obc-joint"):
            pairs.append((f"{policy_class.name} + {score}", policy_class(budget=budget, score=score)))
    return pairs


def run_demo(
    model_name: str | None = None,
    *,
    length: int = 2048,
    budget: float | int = 0.2,
    query_aware: bool = True,
    device: str | None = None,
    dtype: str | None = None,
) -> list[dict]:
    """Answer one needle question under each policy; print and return the table rows."""
    pairs = demo_policies(budget)  # validates the budget before loading anything
    model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    sample = make_sample("niah_single_number", tokenizer, length, seed=0, depth=0.5)
    mode = "query-aware (question inside the compressed prompt)" if query_aware else "query-agnostic"
    print(f"needle at depth 0.5 of a {length}-token context; expected {sample.expected[0]}; budget {budget!r}; {mode}")
    rows = []
    for label, policy in tqdm(pairs, desc="policies", file=sys.stderr):
        result = generate(
            model, tokenizer, sample.context, sample.question, policy=policy, query_aware=query_aware,
            max_new_tokens=16, answer_prefix=sample.answer_prefix,
        )
        rows.append({
            "policy": label,
            "answer": result.text.strip().replace("\n", " ")[:40],
            "correct": score_prediction(sample, result.text) == 1.0,
            "kept": result.kept_per_layer[0],
            "seen": result.tokens_seen,
            "cache_mib": result.cache_bytes_kept / 2**20,
            "seconds": result.prefill_seconds + result.decode_seconds,
        })
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"| {'policy':24s} | {'answer':40s} | correct | kept/seen | cache MiB | time s |"
    lines = [header, "|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|"]
    for row in rows:
        lines.append(
            f"| {row['policy']:24s} | {row['answer']:40s} | {'yes' if row['correct'] else 'no':7s} | "
            f"{row['kept']:>4d}/{row['seen']:<4d} | {row['cache_mib']:9.2f} | {row['seconds']:6.1f} |"
        )
    return "\n".join(lines)
