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
    assert second.cache.get_seq_length() == len(fed) + len(second.token_ids) - len(second.pending)


@pytest.mark.parametrize("policy", [SnapKV(budget=0.3, window=8, score="obc-joint"),
                                    Decoding(H2O(budget=0.3, window=4, score="obc-key"), capacity=40, interval=4)])
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


# ---------------------------------------------------------------- a history is never mutated; limits before work


@pytest.mark.parametrize("policy", [None, SnapKV(budget=0.3, window=8, score="obc-key"),
                                    Decoding(H2O(budget=0.3, window=4, score="obc-key"), capacity=30, interval=4)])
def test_a_history_used_twice_gives_the_same_turn_and_stays_unchanged(model, tokenizer, policy):
    """A retry (or a second branch) continues from the history as it was, not on top of the first follow-up."""
    first = generate(model, tokenizer, CONTEXT, "What jumps?", policy=policy, query_aware=True, max_new_tokens=5)
    seen, held = first.cache.get_seq_length(), [layer.keys.clone() for layer in first.cache.layers]
    one = generate(model, tokenizer, "And then?", history=first, max_new_tokens=6)
    two = generate(model, tokenizer, "And then?", history=first, max_new_tokens=6)
    assert one.token_ids == two.token_ids
    assert first.cache.get_seq_length() == seen
    assert all(torch.equal(layer.keys, before) for layer, before in zip(first.cache.layers, held))


def test_ask_keeps_evicting_during_decoding_under_a_bounded_compression(model, tokenizer):
    bounded = Decoding(H2O(budget=24, window=4, score="obc-key"), capacity=24, interval=4)
    doc = generate(model, tokenizer, CONTEXT * 3, "What jumps?", policy=bounded, max_new_tokens=30)
    other = obcache.ask(model, tokenizer, doc, "Who sleeps?", max_new_tokens=30)
    assert len(other.token_ids) == 30  # enough new tokens to pass the bound several times
    for layer in range(len(other.cache.layers)):
        assert other.cache.head_lengths(layer).float().mean() < 24 + 4  # bounded, as the compression was


def test_ask_on_a_later_turn_asks_the_conversation_s_compressed_context(model, tokenizer):
    policy = SnapKV(budget=0.5, window=4, score="obc-key")
    first = generate(model, tokenizer, CONTEXT, "What jumps?", policy=policy, max_new_tokens=4)
    later = generate(model, tokenizer, "And then?", history=first, max_new_tokens=4)
    assert obcache.ask(model, tokenizer, later, "Who sleeps?", max_new_tokens=4).token_ids == \
        obcache.ask(model, tokenizer, first, "Who sleeps?", max_new_tokens=4).token_ids
    aware = generate(model, tokenizer, CONTEXT, "What jumps?", policy=policy, query_aware=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="query_aware=True"):
        obcache.ask(model, tokenizer, generate(model, tokenizer, "And?", history=aware, max_new_tokens=2), "Who?")


def test_a_prompt_past_the_model_s_positions_is_refused_before_any_work(tokenizer):
    small = tiny_model(vocab_size=len(tokenizer))
    small.config.max_position_embeddings = 64
    calls = []
    small.model.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="limit of 64 positions"):
        generate(small, tokenizer, CONTEXT * 4, "What jumps?", max_new_tokens=4)
    short = "The fox jumps."
    with pytest.raises(ValueError, match="plus max_new_tokens=60 pass the model's limit of 64 positions"):
        generate(small, tokenizer, short, "What?", max_new_tokens=60)
    assert not calls
    first = generate(small, tokenizer, short, "What?", max_new_tokens=4)
    calls.clear()
    with pytest.raises(ValueError, match="limit of 64 positions"):
        generate(small, tokenizer, "And then? " * 10, history=first, max_new_tokens=30)
    assert not calls
