"""obcache.generate: one prompt, and later turns on the evicted cache of the turn before."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import obcache
from obcache import Decoding, H2O, SnapKV
from obcache.generation import GenerationResult, build_prompt, generate, turn_ids
from obcache.loading import load_tokenizer
from tests.conftest import tiny_model

CONTEXT = "The quick brown fox jumps over the lazy dog. " * 12




def test_an_empty_prompt_is_a_clear_error(model, tokenizer):
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, tokenizer, "", None, chat_template=False)


def test_turn_ids_close_the_answer_and_open_the_next_turn(tokenizer):
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}]
    text = tokenizer.decode(turn_ids(tokenizer, messages, "Next?", chat_template=True, answer_prefix="Sure,"))
    assert text == "<|im_end|>\n<|im_start|>user\nNext?<|im_end|>\n<|im_start|>assistant\nSure,"


@pytest.mark.parametrize("max_new_tokens", [5, 40])  # 5: the last token is pending; 40: stops at the end of turn
def test_a_later_turn_continues_exactly_as_one_forward_over_the_whole_conversation(model, tokenizer, max_new_tokens):
    """Full cache: the second turn's answer equals plain greedy decoding of every id fed so far, in one piece."""
    first = generate(model, tokenizer, CONTEXT, "What jumps?", max_new_tokens=max_new_tokens)
    second = generate(model, tokenizer, "And then?", history=first, max_new_tokens=6)
    context_ids, question_ids = build_prompt(tokenizer, CONTEXT, "What jumps?")
    fed = context_ids + question_ids + first.token_ids + turn_ids(tokenizer, first.messages, "And then?", chat_template=True)
    plain = model.generate(torch.tensor([fed]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(fed):]
    eos = tokenizer.eos_token_id
    expected = plain.tolist()
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert second.token_ids == expected
    assert first.cache is second.cache and second.cache.get_seq_length() == len(fed) + len(second.token_ids) - len(second.pending)


@pytest.mark.parametrize("policy", [SnapKV(budget=0.3, window=8, score="obc-joint"),
                                    Decoding(H2O(budget=0.3, window=4, score="obc-key"), budget=40, interval=4)])
def test_turns_on_an_evicted_cache_equal_generate_calls_on_the_same_cache(model, tokenizer, policy):
    first = generate(model, tokenizer, CONTEXT, "What jumps?", policy=policy, query_aware=True, max_new_tokens=5)
    assert first.kept_per_layer[0] < first.tokens_seen
    second = generate(model, tokenizer, "And then?", history=first, policy=policy, max_new_tokens=6)
    # the same two turns through model.generate on one cache
    context_ids, question_ids = build_prompt(tokenizer, CONTEXT, "What jumps?")
    prompt_ids = context_ids + question_ids
    with policy.attach(model):
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=5, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
        assert out.sequences[0, len(prompt_ids):].tolist() == first.token_ids
        follow = turn_ids(tokenizer, first.messages, "And then?", chat_template=True)
        ids = torch.cat([out.sequences, torch.tensor([follow])], dim=1)
        again = model.generate(ids, past_key_values=out.past_key_values, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)
    assert second.token_ids == again[0, ids.shape[1]:].tolist()[: len(second.token_ids)]


def test_a_turn_without_a_cache_is_rejected(model, tokenizer):
    first = generate(model, tokenizer, CONTEXT, "What jumps?", max_new_tokens=3)
    first.cache = None
    with pytest.raises(ValueError, match="no cache"):
        generate(model, tokenizer, "And then?", history=first)
    assert obcache.generate is generate


def test_summary_reports_the_mean_kept_tokens_over_layers():
    """Under GlobalKV or PyramidKV every layer keeps a different number of tokens per head."""
    result = GenerationResult(text="", token_ids=[1, 2], context_tokens=100, question_tokens=5, kept_per_layer=[10.0, 25.0],
                              cache_bytes_full=1000, cache_bytes_kept=175, prefill_seconds=1.0, eviction_seconds=0.1,
                              decode_seconds=0.5)
    assert "kept 17.5/100 tokens per head" in result.summary() and "(17.5%)" in result.summary()
    assert "rated" not in result.summary()
    rated = replace(result, calibration_seconds=24.56).summary()
    assert rated.endswith("decode 2 tokens in 0.50s; heads rated once for this model in 24.6s")
