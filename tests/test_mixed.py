"""Eviction and precision together (Quantized, MixedPrecision), against independent references: a full-cache
run whose attention uses exactly the stored (dequantized) keys and values and hides what each head dropped;
bytes counted by hand; bad input refused before any work."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

import obcache
from obcache import H2O, AdaKV, Decoding, KVzipHeads, MixedPrecision, Quantized, SnapKV
from obcache.layer_state import LayerState
from obcache.precision import bytes_per_token
from tests.conftest import tiny_model
from tests.test_eviction import left_padded_pair, prompt

STEPS = 6
GROUP = 4  # the tiny models' head dim is 8

MODES = {
    "quantized-4": lambda: Quantized(SnapKV(budget=24, window=4, score="obc-key"), bits=4, group_size=GROUP),
    "quantized-2-adakv": lambda: Quantized(AdaKV(SnapKV(budget=20, window=4, score="obc-joint", chunk=2)), bits=2,
                                           group_size=GROUP),
    "mixed": lambda: MixedPrecision(SnapKV(budget=30, window=4, score="obc-key"), byte_budget=0.25, group_size=GROUP),
    "mixed-adakv-spans": lambda: MixedPrecision(obcache.recommended(budget=0.6, window=4, kernel=3, chunk=4),
                                                byte_budget=0.35, group_size=GROUP),
    "quantized-bytes-adakv": lambda: Quantized(obcache.recommended(budget=1.0, window=4, kernel=3, chunk=4), bits=2,
                                               byte_budget=0.3, group_size=GROUP),
    "quantized-kvzip-heads": lambda: Quantized(KVzipHeads(budget=0.5, sinks=2, ratings=torch.tensor([[1.0, 3.0],
                                                                                                     [2.0, 0.5]])),
                                               bits=4, group_size=GROUP),
    "mixed-kvzip-heads": lambda: MixedPrecision(KVzipHeads(budget=0.6, sinks=2, ratings=torch.tensor([[1.0, 3.0],
                                                                                                      [2.0, 0.5]])),
                                                byte_budget=0.3, group_size=GROUP),
}


def stored_reference(model, ids, attention_mask, cache, steps: int):
    """Greedy logits [B, steps, V] of the full cache whose attention, after the prefill, reads every held position's
    key and value as `cache` stores them (its grid, dequantized) and hides every other position."""
    grids = [layer.grid() for layer in cache.layers]
    count = {"forward": -1}

    def attention(module, query, key, value, mask4d, scaling, dropout=0.0, **kwargs):
        if module.layer_idx == 0:
            count["forward"] += 1
        group = query.shape[1] // key.shape[1]
        key, value = key.clone(), value.clone()
        length = key.shape[2]
        hidden = torch.zeros(key.shape[0], key.shape[1], length, dtype=torch.bool)
        if count["forward"] > 0:
            grid = grids[module.layer_idx]
            hidden[:] = True
            for row in range(key.shape[0]):
                for head in range(key.shape[1]):
                    held = grid.valid[row, head] & (grid.positions[row, head] < length)
                    slots = grid.positions[row, head][held].long()
                    key[row, head, slots] = grid.keys[row, head][held].to(key.dtype)
                    value[row, head, slots] = grid.values[row, head][held].to(value.dtype)
                    hidden[row, head, slots] = False
        logits = scaling * query @ key.repeat_interleave(group, 1).transpose(-1, -2)
        query_positions = torch.arange(length - query.shape[2], length)
        causal = torch.arange(length)[None, :] > query_positions[:, None]
        padding = ~padding_mask[:, None, None, :length]
        masked = causal[None, None] | padding | hidden.repeat_interleave(group, 1)[:, :, None, :]
        weights = logits.masked_fill(masked, float("-inf")).softmax(-1).nan_to_num(0.0)
        return (weights @ value.repeat_interleave(group, 1)).transpose(1, 2).contiguous(), None

    padding_mask = torch.cat([attention_mask.bool(), torch.ones(ids.shape[0], steps, dtype=torch.bool)], -1)
    AttentionInterface.register("obcache_stored_reference", attention)
    original = model.config._attn_implementation
    model.set_attn_implementation("obcache_stored_reference")
    try:
        out = model.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=steps, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    finally:
        model.set_attn_implementation(original)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_tokens_and_logits_equal_the_full_cache_reading_the_stored_keys_and_values(family, mode):
    model = tiny_model(family)
    ids, mask = left_padded_pair()
    with MODES[mode]().attach(model):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    cache = out.past_key_values
    assert not cache.layers[0].uniform and len(cache.layers[0].parts) > 1  # really stored at several widths
    sequences, logits = stored_reference(model, ids, mask, cache, STEPS)
    assert torch.equal(out.sequences, sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, rtol=1e-4, atol=1e-4)


def prefilled(model, policy, ids: torch.Tensor) -> obcache.EvictableCache:
    """The cache `policy` leaves after the prompt `ids`."""
    cache = obcache.EvictableCache()
    with policy.attach(model), torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
    return cache


def test_quantized_bytes_are_the_codes_scales_zeros_and_16_bit_tokens_held():
    model = tiny_model()
    policy = Quantized(SnapKV(budget=24, window=4, score="obc-key"), bits=4, group_size=GROUP)
    cache = prefilled(model, policy, prompt())
    layer = cache.layers[0]
    assert layer.parts[4].head_lengths().tolist() == [[20, 20]] and layer.parts[16].head_lengths().tolist() == [[4, 4]]
    # slots of each part's blocks (partly filled last blocks included) x bytes of a key and a value at its width
    expected = sum(part.block * len(part.owner) * 2 * bytes_per_token(width, 8, GROUP)
                   for width, part in layer.parts.items())
    assert layer.nbytes() == expected
    # the cache counts every byte held: these, and the index (positions, block tables, lengths of every part)
    index = sum(sum(t.nbytes for t in (part.positions, part.owner, part.table, part.lengths, part.free, part.route))
                for layer in cache.layers for part in layer.parts.values())
    assert cache.index_nbytes() == index and cache.nbytes() == sum(layer.nbytes() for layer in cache.layers) + index
    assert 2 * bytes_per_token(4, 8, GROUP) == 2 * (8 * 4 // 8 + 2 * 2 * 8 // GROUP)  # codes + float16 scale, zero


def test_mixed_precision_stays_within_its_byte_budget_and_token_cap():
    model = tiny_model()
    policy = MixedPrecision(SnapKV(budget=30, window=4, score="obc-key"), byte_budget=0.25, group_size=GROUP)
    cache = prefilled(model, policy, prompt())
    for layer in cache.layers:
        held = sum(int(part.head_lengths().sum()) * 2 * bytes_per_token(width, 8, GROUP)
                   for width, part in layer.parts.items())
        assert held <= 0.25 * 40 * 2 * 2 * 2 * 8  # fraction x tokens x heads x (K, V) x 16-bit bytes of 8 dims
        assert int(layer.head_lengths().sum()) <= 30 * 2  # the policy's budget caps the tokens kept, any width
        assert {16}.issubset(layer.parts)  # the protected window stays at 16 bits


def test_quantized_at_a_byte_budget_keeps_as_many_tokens_as_the_bytes_hold():
    model = tiny_model()
    length, heads = 40, 2
    for bits in (8, 4, 2, 16):
        policy = Quantized(SnapKV(budget=1.0, window=4, sinks=2, score="obc-key"), bits=bits, byte_budget=0.3,
                           group_size=GROUP)
        whole, packed = 2 * bytes_per_token(16, 8, GROUP), 2 * bytes_per_token(bits, 8, GROUP)  # a key and a value
        budget = 0.3 * length * whole  # per KV head: 30% of the 16-bit bytes
        fits = policy.fits(length)  # 6 protected tokens at 16 bits, the rest at `bits`
        assert 6 * whole + (fits - 6) * packed <= budget < 6 * whole + (fits - 5) * packed
        cache = prefilled(model, policy, prompt(length=length))
        for layer in cache.layers:
            held = {width: int(part.head_lengths().sum()) for width, part in layer.parts.items()}
            assert held[16] == heads * (6 if bits != 16 else fits) and sum(held.values()) == heads * fits
            assert layer.nbytes() >= heads * (6 * whole + (fits - 6) * packed)  # + partly filled last blocks
    capped = Quantized(SnapKV(budget=10, window=4, score="obc-key"), bits=2, byte_budget=0.3, group_size=GROUP)
    assert capped.kept_tokens(length) == 10 and capped.label() == "quantized[bits=2,cap=10,group=4](snapkv[window=4])"


def test_quantized_over_a_pool_of_every_layer_keeps_what_the_pool_keeps():
    model = tiny_model()
    ratings = torch.tensor([[1.0, 3.0], [2.0, 0.5]])
    plain, quantized = (prefilled(model, policy, prompt()) for policy in (
        KVzipHeads(budget=0.5, sinks=2, ratings=ratings),
        Quantized(KVzipHeads(budget=0.5, sinks=2, ratings=ratings), bits=4, group_size=GROUP)))
    for index in range(len(plain.layers)):
        assert torch.equal(plain.head_lengths(index), quantized.head_lengths(index))
        assert all(torch.equal(a, b) for row_a, row_b in zip(plain.kept_positions(index), quantized.kept_positions(index))
                   for a, b in zip(row_a, row_b))
    assert plain.head_lengths(0).tolist() != [[20, 20]]  # the pool moved budget between heads


def test_continuing_in_two_calls_equals_one_call_and_several_tokens_equal_one_at_a_time():
    model = tiny_model()
    ids = prompt()
    with MODES["mixed"]().attach(model), torch.no_grad():
        one = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        first = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        two = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=4, do_sample=False,
                             pad_token_id=0)
        assert torch.equal(one, two)
        more = torch.tensor([[7, 9, 11]])  # three tokens at once (the grid path) vs one at a time (the block path)
        together, alone = (first.past_key_values.fork() for _ in range(2))
        at_once = model(input_ids=more, past_key_values=together).logits[0]
        singly = torch.cat([model(input_ids=more[:, i:i + 1], past_key_values=alone).logits[0] for i in range(3)])
    torch.testing.assert_close(at_once, singly, rtol=1e-4, atol=1e-4)


def test_decoding_re_allocates_new_tokens_and_keeps_the_cache_bounded():
    model = tiny_model()
    policy = Decoding(Quantized(H2O(budget=24, window=4, score="obc-key"), bits=2, group_size=GROUP), capacity=20,
                      interval=4)
    with policy.attach(model):
        out = model.generate(prompt(), max_new_tokens=30, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    for layer in out.past_key_values.layers:
        assert layer.head_lengths().float().mean() < 20 + 4
        assert int(layer.parts[2].head_lengths().sum()) > 0  # generated tokens were re-stored at 2 bits


@pytest.mark.parametrize("make,message", [
    (lambda: Quantized(SnapKV(), bits=3), "widths must be in {0, 2, 4, 8, 16}"),
    (lambda: MixedPrecision(SnapKV(), bits=(16, 6)), "widths must be in {0, 2, 4, 8, 16}"),
    (lambda: MixedPrecision(SnapKV(), byte_budget=1.5), "byte_budget is the fraction"),
    (lambda: Quantized(SnapKV(), bits=0), "bits must be 2, 4, 8 or 16"),
    (lambda: Quantized(SnapKV(), bits=4, byte_budget=2), "byte_budget is the fraction"),
])
def test_bad_settings_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_group_that_does_not_divide_the_head_dim_and_a_budget_below_the_protected_tokens_fail_before_work():
    model = tiny_model()
    forwards = []
    model.model.layers[0].register_forward_pre_hook(lambda *args: forwards.append(1))  # after obcache's checks
    with pytest.raises(ValueError, match="group_size 3 does not divide the head dimension 8; allowed: \\[1, 2, 4, 8\\]"):
        Quantized(SnapKV(window=4), bits=4, group_size=3).attach(model)
    tight = MixedPrecision(SnapKV(budget=0.5, window=8, sinks=4), byte_budget=0.1, group_size=GROUP)
    with tight.attach(model), pytest.raises(ValueError, match="fewer than the 12 protected ones"):
        model(input_ids=prompt())
    assert not forwards


def outlier_state(outlier: float) -> LayerState:
    """One row, 2 KV heads of 64 tokens (head dim 8, 2 query heads each) whose channel 0 is `outlier` times the
    others in keys and queries (a huge-logit layer, as Qwen2.5's first ones, when large)."""
    generator = torch.Generator().manual_seed(9)
    keys, values = torch.randn(1, 2, 64, 8, generator=generator), torch.randn(1, 2, 64, 8, generator=generator)
    queries = torch.randn(1, 4, 8, 8, generator=generator)
    keys[..., 0] *= outlier
    queries[..., 0] *= outlier
    return LayerState(keys=keys, values=values, scaling=8 ** -0.5, query_heads=4, key_mask=None,
                      queries=lambda start, end: queries[:, :, start - 56:end - 56], new_queries=lambda: queries)


def test_a_width_whose_key_error_moves_the_logits_by_over_a_nat_is_priced_as_eviction():
    """The model's linearisation holds for small logit errors: where 4 bits moves them by more than LOGIT_TRUST
    (measured by hand here), MixedPrecision keeps 16/8 bits or evicts, never 4; where it does not, 4 bits is used."""
    from obcache.policies.mixed import LOGIT_TRUST
    from obcache.precision import logit_noise

    policy = MixedPrecision(SnapKV(budget=1.0, window=4, score="obc-key"), byte_budget=0.3, group_size=GROUP)
    for outlier, trusted in ((1.0, True), (400.0, False)):
        state = outlier_state(outlier)
        worst = max(logit_noise(state.new_queries()[0, 2 * h:2 * h + 2, -16:].reshape(-1, 8), state.keys[0, h], 4,
                                GROUP, state.scaling) for h in range(2))
        assert (worst <= LOGIT_TRUST) == trusted
        widths = policy.select(state, torch.rand(1, 2, 64, generator=torch.Generator().manual_seed(1))).bits
        assert bool((widths == 4).any()) == trusted
        assert bool((widths > 0).any())
