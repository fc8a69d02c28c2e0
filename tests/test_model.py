"""Real-model checks on the default model (SmolLM2-135M-Instruct). Run with `pytest -m model`.

The needle sanity check of environment.md: " The secret number is 73914. " at
depth 0.1 / 0.5 / 0.9 of a ~2k-token haystack, question and answer prefix as there.
"""

from __future__ import annotations

import pytest
import torch

import obcache
from obcache.text import filler_sentences

pytestmark = pytest.mark.model

NEEDLE = " The secret number is 73914. "
QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
PREFIX = "The secret number is"


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return obcache.load_model()


def haystack(tokenizer, depth: float, length: int = 2000) -> str:
    sentences = filler_sentences(tokenizer, length, seed=0)
    cut = round(depth * len(sentences))
    return " ".join(sentences[:cut]) + NEEDLE + " ".join(sentences[cut:])


def answer(model_and_tokenizer, depth: float, policy=None, query_aware: bool = True) -> str:
    model, tokenizer = model_and_tokenizer
    result = obcache.generate(
        model, tokenizer, haystack(tokenizer, depth), QUESTION, policy=policy, query_aware=query_aware,
        max_new_tokens=10, answer_prefix=PREFIX,
    )
    return result.text


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_full_cache_at_2k(model_and_tokenizer, depth):
    assert "73914" in answer(model_and_tokenizer, depth)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_query_aware_snapkv_obc_joint_at_20_percent(model_and_tokenizer, depth):
    """SnapKV + obc-joint keeping 20% of the prompt finds the needle.

    Kernel 9, not the paper's 7: SmolLM2 tokenizes one digit per token and the
    window queries attend to the needle's first digit; a max-pool of radius 3
    then covers only "7391" and every score (attention included) answers 7391.
    Radius 4 covers the 5 digits. (The paper's Llama-3 tokenizer packs 3 digits
    per token.)
    """
    policy = obcache.SnapKV(budget=0.2, score="obc-joint", kernel=9)
    assert "73914" in answer(model_and_tokenizer, depth, policy)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_query_agnostic_kvzip_at_50_percent(model_and_tokenizer, depth):
    """The question after compression: KVzip's reconstruction queries with a global budget pool find the needle
    that no window-scored policy keeps (RESULTS.md section 2)."""
    policy = obcache.GlobalKV(obcache.KVzip(budget=0.5, score="obc-joint"))
    assert "73914" in answer(model_and_tokenizer, depth, policy, query_aware=False)


HEAD_LEVEL = obcache.KVzipHeads(budget=0.5, score="attention")  # the paper's global pool; rated once per model


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_needle_query_agnostic_head_level_kvzip_at_50_percent(model_and_tokenizer, depth):
    """KVzip's head-level variant (heads rated once on the shipped text; then the prefill alone) keeps the needle
    in the copy heads of the whole model."""
    model, _ = model_and_tokenizer
    assert "73914" in answer(model_and_tokenizer, depth, HEAD_LEVEL, query_aware=False)
    rated = HEAD_LEVEL.prepare(model)  # fitted once already: no tokenizer needed again
    assert rated.ratings.scores.shape == (len(model.model.layers), model.config.num_key_value_heads)


def test_attach_with_full_budget_matches_plain_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    inputs = tokenizer(["Long ago, in a quiet village by the sea,", "The three laws of robotics are"], return_tensors="pt", padding=True)
    plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    with obcache.SnapKV(budget=1.0, window=4, score="obc-joint").attach(model):
        hooked = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert torch.equal(plain, hooked)


def test_cache_really_shrinks_on_the_default_model(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    result = obcache.generate(
        model, tokenizer, haystack(tokenizer, 0.5, 1000), QUESTION, policy=obcache.H2O(budget=0.1, score="obc-value"),
        max_new_tokens=4, answer_prefix=PREFIX,
    )
    kept = round(0.1 * result.context_tokens)
    assert result.kept_per_layer == [kept] * 30
    # 30 layers x (K + V) x 3 KV heads (GQA kept, not 9) x kept x 64 dims x 4 bytes
    assert result.cache_bytes_kept == 30 * 2 * 3 * kept * 64 * 4
    assert abs(result.cache_bytes_kept / result.cache_bytes_full - kept / result.context_tokens) < 1e-9
