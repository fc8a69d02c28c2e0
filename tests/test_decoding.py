"""Eviction during decoding and continuation on an evicted cache, against independent references."""

from __future__ import annotations

import pytest
import torch

import obcache
from obcache import H2O, TOVA, AdaKV, Decoding, EvictableCache, SnapKV, StreamingLLM
from obcache.capture import Observer
from obcache.policies.decoding import RUNNING
from tests.conftest import tiny_model
from tests.reference import generate_with_logits, masked_reference
from tests.test_eviction import left_padded_pair, prompt

STEPS = 14


def decode_by_hand(model, policy, ids, steps, attention_mask=None):
    """Greedy decoding under `policy`, one forward per token; after every forward, what each head holds.

    Returns (tokens [B, steps], logits [B, steps, V], kept [forward][layer] -> [B, Hkv, seen] bool in
    input coordinates, the cache).
    """
    batch = ids.shape[0]
    mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
    pad = (mask == 0).sum(-1)
    cache = EvictableCache()
    tokens, logits, kept = [], [], []
    with policy.attach(model), torch.no_grad():
        inputs = ids
        for _ in range(steps):
            out = model(input_ids=inputs, attention_mask=mask, past_key_values=cache)
            seen = cache.get_seq_length()
            snapshot = []
            for layer in range(len(cache.layers)):
                grid = torch.zeros(batch, len(cache.kept_positions(layer)[0]), seen, dtype=torch.bool)
                for row, heads in enumerate(cache.kept_positions(layer)):
                    for head, positions in enumerate(heads):
                        grid[row, head, positions + pad[row]] = True
                snapshot.append(grid)
            kept.append(snapshot)
            logits.append(out.logits[:, -1])
            inputs = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(inputs)
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=-1)
    return torch.cat(tokens, 1), torch.stack(logits, 1), kept, cache


def dropped_as_recorded(kept):
    """The reference hides, at forward t, what the heads did not hold after forward t - 1."""

    def dropped(layer_idx: int, forward: int):
        return None if forward == 0 else ~kept[forward - 1][layer_idx]

    return dropped


POLICIES = {
    "h2o": lambda: Decoding(H2O(budget=16, window=3, score="obc-joint"), capacity=12, interval=3),
    "tova": lambda: Decoding(TOVA(budget=14, score="obc-key"), capacity=10, interval=2),
    "snapkv": lambda: Decoding(SnapKV(budget=16, window=4, kernel=3, score="obc-value"), capacity=12, interval=4),
    "streaming": lambda: Decoding(StreamingLLM(budget=12, sinks=2), capacity=9, interval=1),
    "adakv-h2o": lambda: Decoding(AdaKV(H2O(budget=14, window=2, score="attention")), capacity=11, interval=3),
    "adakv-snapkv": lambda: Decoding(AdaKV(SnapKV(budget=14, window=3, score="obc-joint"), alpha=0.3), capacity=10, interval=2),
    "shared-tova": lambda: Decoding(TOVA(budget=12, score="obc-joint", selection="shared", chunk=2), capacity=10, interval=3),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_decode_time_eviction_matches_the_masked_reference(family, name):
    """Tokens and logits equal the full cache hiding, at every step, exactly what each head had dropped."""
    model = tiny_model(family)
    ids, mask = left_padded_pair()
    tokens, logits, kept, cache = decode_by_hand(model, POLICIES[name](), ids, STEPS, mask)
    reference_tokens, reference_logits = masked_reference(model, ids, STEPS, dropped_as_recorded(kept), mask)
    assert torch.equal(tokens, reference_tokens[:, ids.shape[1]:])
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)
    policy = POLICIES[name]()
    for layer in range(len(cache.layers)):  # bounded: at most budget + interval - 1 slots per head on average
        assert cache.head_lengths(layer).float().mean() < policy.capacity + policy.interval
        assert cache.kept_tokens()[layer] <= policy.capacity + policy.interval


def test_a_uniform_layer_under_decoding_holds_capacity_plus_interval_slots():
    """Evicted (the prompt, then every interval) to `capacity`, a uniform layer is given room for the `interval`
    appends before its next eviction once, and never grows: K/V bytes = (capacity + interval) slots' worth."""
    model = tiny_model()
    capacity, interval = 12, 4
    policy = Decoding(SnapKV(budget=capacity, window=4, score="obc-joint"), capacity=capacity, interval=interval)
    config = model.config
    slot_bytes = 2 * config.num_key_value_heads * config.head_dim * 4 * config.num_hidden_layers  # K and V, float32
    cache = EvictableCache()
    with policy.attach(model), torch.no_grad():
        token = model(input_ids=prompt(), past_key_values=cache).logits[:, -1:].argmax(-1)
        for _ in range(3 * interval + 1):
            assert cache.kv_nbytes() == (capacity + interval) * slot_bytes
            assert not any(cache.is_ragged(layer) for layer in range(len(cache.layers)))
            token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
        assert all(capacity <= n <= capacity + interval for n in cache.kept_tokens())


def test_decode_budget_larger_than_everything_is_plain_generation(family):
    model = tiny_model(family)
    ids = prompt()
    plain = generate_with_logits(model, ids, 10)
    with Decoding(SnapKV(budget=1.0, window=4, score="obc-joint"), capacity=200, interval=1).attach(model):
        hooked = generate_with_logits(model, ids, 10)
    assert torch.equal(plain[0], hooked[0])
    torch.testing.assert_close(plain[1], hooked[1], rtol=1e-5, atol=1e-5)


class _AllQueries(Observer):
    """Post-RoPE queries of every token of a forward, for one layer (obcache's own capture)."""

    def __init__(self, layer_idx):
        self.layer_idx, self.queries = layer_idx, None

    def layer_done(self, state, record):
        if state.layer_idx == self.layer_idx:
            self.queries = state.new_queries()


def test_h2o_running_scores_equal_a_float64_recomputation():
    """The accumulated decode scores = prefill window scores + each generated query's score, in float64."""
    model = tiny_model().double()
    ids = prompt()
    policy = Decoding(H2O(budget=1.0, window=4, score="obc-joint"), capacity=500, interval=1)  # never evicts
    cache = EvictableCache()
    with policy.attach(model), torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache)
        sequence = [ids]
        for _ in range(5):
            sequence.append(out.logits[:, -1:].argmax(-1))
            out = model(input_ids=sequence[-1], past_key_values=cache)
    everything = torch.cat(sequence, 1)
    recorder = _AllQueries(layer_idx=1)
    with obcache.attach(model, observers=[recorder]), torch.no_grad():
        model(input_ids=everything, past_key_values=EvictableCache())
    layer = cache.layers[1]
    keys, values, length = layer.keys, layer.values, everything.shape[1]
    expected = torch.zeros(1, 2, length, dtype=torch.float64)
    prompt_length = ids.shape[1]
    for position in [*range(prompt_length - 4, prompt_length), *range(prompt_length, length)]:
        one = recorder.queries[:, :, position : position + 1]
        k, v = keys[:, :, : position + 1], values[:, :, : position + 1]
        logits = model.model.layers[1].self_attn.scaling * one.repeat(1, 1, 1, 1) @ k.repeat_interleave(3, 1).transpose(-1, -2)
        weights = logits.softmax(-1)  # [1, Hq, 1, p + 1]
        outputs = weights @ v.repeat_interleave(3, 1)
        z = logits
        change = weights[..., None] * ((1 + z)[..., None] * v.repeat_interleave(3, 1)[:, :, None] - z[..., None] * outputs[:, :, :, None])
        per_head = change.square().sum(-1)[:, :, 0]  # [1, Hq, p + 1]: ||dA_ip ((1+z) v_p - z o_i)||^2
        expected[..., : position + 1] += per_head.view(1, 2, 3, -1).sum(2)
    running = layer.rider(RUNNING)  # the running scores ride along the layer's slots
    assert running.shape == (1, 2, length)
    torch.testing.assert_close(running.double(), expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("interval, padded", [(4, False), (4, True), (2, False), (3, True)])
def test_decode_scoring_uses_captured_outputs_only_where_they_are_exact(monkeypatch, interval, padded):
    """Every window a policy scores with comes with attention outputs equal to a float64 recomputation over the
    slots the view holds: the ones the model computed (kept since the layer's last eviction) where still exact,
    and recomputed otherwise (an interval shorter than the window: some of its queries saw slots evicted since);
    once the window has passed since an eviction, the captured ones are used."""
    from obcache.policies.base import ScoredPolicy

    calls, saliency = [], ScoredPolicy.saliency

    def spy(self, queries, keys, values, scaling, **options):
        scores = saliency(self, queries, keys, values, scaling, **options)
        outputs, key_mask = options.get("outputs"), options.get("key_mask")
        calls.append((queries, keys.clone(), values.clone(), scaling,  # views of storage compacted in place later
                      None if outputs is None else outputs.clone(), key_mask))
        return scores

    monkeypatch.setattr(ScoredPolicy, "saliency", spy)
    model = tiny_model()
    ids, mask = left_padded_pair() if padded else (prompt(), None)
    policy = Decoding(SnapKV(budget=16, window=4, score="obc-joint"), capacity=12, interval=interval)
    decode_by_hand(model, policy, ids, 24, mask)
    prefill_calls = len(model.model.layers)
    captured = 0
    for queries, keys, values, scaling, outputs, key_mask in calls:
        if outputs is None:
            continue
        captured += 1
        width, length, group = queries.shape[2], keys.shape[2], queries.shape[1] // keys.shape[1]
        seen = torch.arange(length)[None, :] <= torch.arange(length - width, length)[:, None]  # [W, L]
        if key_mask is not None:
            seen = seen & (key_mask[:, None, None] if key_mask.dim() == 2 else key_mask[:, :, None]).bool()
        keys, values = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
        logits = scaling * queries.double() @ keys.transpose(-1, -2)
        expected = logits.masked_fill(~seen, float("-inf")).softmax(-1) @ values
        torch.testing.assert_close(outputs.double(), expected, rtol=1e-5, atol=1e-5)
    decode_calls = calls[prefill_calls:]
    assert len(decode_calls) >= 4 * len(model.model.layers)  # evictions while decoding, in every layer
    used = sum(outputs is not None for *_, outputs, _ in decode_calls)
    assert used >= 3 * len(model.model.layers) if interval >= 4 else used == 0


# ---------------------------------------------------------------- continuing on an evicted cache

CONTINUATION = {
    "full cache": lambda: None,
    "prefill eviction": lambda: SnapKV(budget=12, window=4, score="obc-joint"),
    "ragged prefill eviction": lambda: AdaKV(SnapKV(budget=12, window=4, score="obc-joint")),
    "decode-time eviction": lambda: Decoding(H2O(budget=14, window=3, score="obc-key"), capacity=12, interval=2),
}


@pytest.mark.parametrize("splits", [(12,), (4, 8), (3, 5, 4)])
@pytest.mark.parametrize("mode", sorted(CONTINUATION))
@pytest.mark.parametrize("padded", [False, True])
def test_continuing_in_several_generate_calls_equals_one_call(mode, splits, padded):
    model = tiny_model()
    ids, mask = left_padded_pair() if padded else (prompt(), None)
    policy = CONTINUATION[mode]()
    hooks = policy.attach(model) if policy is not None else obcache.attach(model)
    with hooks:
        one = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    cache, sequences, attention = None, ids, mask
    for steps in splits:
        with policy.attach(model) if policy is not None else obcache.attach(model):
            out = model.generate(
                input_ids=sequences, attention_mask=attention, past_key_values=cache, max_new_tokens=steps,
                do_sample=False, pad_token_id=0, return_dict_in_generate=True,
            )
        sequences, cache = out.sequences, out.past_key_values
        if attention is not None:
            attention = torch.cat([attention, torch.ones(2, steps, dtype=attention.dtype)], dim=-1)
    assert torch.equal(sequences, one)
    assert cache.get_seq_length() == sequences.shape[1] - 1  # the last token is not fed yet


def test_an_evicted_cache_outside_attach_raises():
    model = tiny_model()
    policy = SnapKV(budget=12, window=4)
    with policy.attach(model):
        out = model.generate(input_ids=prompt(), max_new_tokens=2, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    with pytest.raises(RuntimeError, match="attach"):
        model.generate(input_ids=out.sequences, past_key_values=out.past_key_values, max_new_tokens=2,
                       do_sample=False, pad_token_id=0)


def test_nested_attach_raises_before_any_work():
    model = tiny_model()
    policy = SnapKV(budget=12, window=4)
    hooks = policy.attach(model)
    with hooks:
        with pytest.raises(RuntimeError, match="already attached"):
            with hooks:
                pass
        with pytest.raises(RuntimeError, match="already attached"):
            with policy.attach(model):
                pass
        # the outer block still evicts
        out = model.generate(input_ids=prompt(), max_new_tokens=1, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
        assert out.past_key_values.kept_tokens() == [12.0, 12.0]
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize("bad,message", [
    (dict(capacity=3), "smaller than the 4 protected"),
    (dict(interval=0), "interval must be an int >= 1"),
    (dict(capacity=0), "capacity must be an int >= 1"),
])
def test_bad_decoding_settings_are_rejected_at_construction(bad, message):
    with pytest.raises(ValueError, match=message):
        Decoding(SnapKV(window=4), **{"capacity": 64, "interval": 8, **bad})


def test_a_selector_that_cannot_score_is_rejected():
    class Custom:
        name = "custom"

    with pytest.raises(TypeError, match="wraps a policy"):
        Decoding(Custom(), capacity=64)


def test_decoding_inside_decoding_is_refused():
    """The inner capacity would be silently ignored."""
    with pytest.raises(ValueError, match="not another Decoding"):
        Decoding(Decoding(H2O(budget=16, window=2), capacity=12, interval=2), capacity=10, interval=2)
