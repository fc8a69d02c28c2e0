"""Eviction on real transformers models (tiny random weights): cache, positions, padding, families."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from transformers import DynamicCache

import obcache
from obcache import H2O, TOVA, AdaKV, EvictableCache, GlobalKV, PyramidKV, SnapKV, StreamingLLM
from obcache.layer_state import LayerState
from obcache.policies import Wrapper
from tests.conftest import kept_indices, tiny_model
from tests.reference import generate_with_logits, keep_masks_dropped, masked_reference

PROMPT_LENGTH = 40


def prompt(batch: int = 1, length: int = PROMPT_LENGTH, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (batch, length), generator=generator)


@dataclass
class Recording(Wrapper):
    """Wraps any policy; remembers the states it saw and the keep masks it chose, per layer."""

    states: list = field(default_factory=list, repr=False)
    chosen: list = field(default_factory=list, repr=False)

    @property
    def name(self) -> str:
        return self.policy.name

    @classmethod
    def wrap(cls, policy) -> "Recording":
        return cls(policy)

    def select(self, layer: LayerState, scores=None):
        mask = self.policy.select(layer, scores)
        self.states.append(layer)
        self.chosen.append(mask)
        return mask

    def select_layers(self, layers, scores):
        masks = self.policy.select_layers(layers, scores)
        self.states.extend(layers)
        self.chosen.extend(masks)
        return masks


# ---------------------------------------------------------------- the cache shrinks


@pytest.mark.parametrize("budget,kept", [(0.25, 10), (13, 13)])
def test_cache_shrinks_to_budget_per_kv_head(budget, kept):
    model = tiny_model()
    cache = EvictableCache(config=model.config)
    with SnapKV(budget=budget, window=4, score="obc-joint").attach(model), torch.no_grad():
        model(input_ids=prompt(), past_key_values=cache)
    assert cache.kept_tokens() == [kept, kept]
    for layer in cache.layers:
        assert layer.keys.shape == (1, 2, kept, 8)  # 2 KV heads: never repeated to the 6 query heads
        assert layer.values.shape == (1, 2, kept, 8)
        # a compact copy, not a view of the full-length storage: the memory is released
        assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes
    assert cache.full_bytes == 2 * 2 * (1 * 2 * PROMPT_LENGTH * 8 * 4)
    assert cache.kv_nbytes() == cache.full_bytes * kept // PROMPT_LENGTH
    # and the index: each row's slot positions, one int32 per kept slot and KV head
    assert cache.nbytes() == cache.kv_nbytes() + 2 * (1 * 2 * kept * 4) == cache.kv_nbytes() + cache.index_nbytes()
    assert cache.get_seq_length() == PROMPT_LENGTH  # the logical length: tokens seen, not slots held


def test_kept_positions_are_sorted_and_protect_window_and_sinks():
    model = tiny_model()
    policy = Recording.wrap(SnapKV(budget=12, window=5, sinks=2, score="obc-key"))
    with policy.attach(model), torch.no_grad():
        model(input_ids=prompt(batch=2))
    for chosen in policy.chosen:
        indices = kept_indices(chosen)
        assert indices.shape == (2, 2, 12)
        for position in [0, 1, *range(PROMPT_LENGTH - 5, PROMPT_LENGTH)]:
            assert (indices == position).any(-1).all()


def test_streaming_llm_keeps_sinks_and_most_recent():
    model = tiny_model()
    with torch.no_grad():
        full = model(input_ids=prompt(), use_cache=True).past_key_values  # no hooks: the full cache
    cache = EvictableCache(config=model.config)
    with StreamingLLM(budget=10, sinks=4).attach(model), torch.no_grad():
        model(input_ids=prompt(), past_key_values=cache)
    expected = torch.tensor([0, 1, 2, 3, *range(PROMPT_LENGTH - 6, PROMPT_LENGTH)])
    for layer, full_layer in zip(cache.layers, full.layers):
        torch.testing.assert_close(layer.keys, full_layer.keys[:, :, expected], rtol=0, atol=0)
        torch.testing.assert_close(layer.values, full_layer.values[:, :, expected], rtol=0, atol=0)


# ---------------------------------------------------------------- queries, scaling, normalisation


def test_recomputed_window_queries_reproduce_the_layer_output(family):
    """softmax(scaling * q k^T) v of the policy's view equals the module's own attention output."""
    model = tiny_model(family)
    for attention in model.model.layers:
        attention.self_attn.scaling = 0.37  # the module's own scaling must be used, not 1/sqrt(d)
    captured = {}

    def capture(module, args):
        captured[module] = args[0].detach()

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(capture) for layer in model.model.layers]
    policy = Recording.wrap(SnapKV(budget=1.0, window=6))
    with policy.attach(model), torch.no_grad():
        model(input_ids=prompt(), past_key_values=EvictableCache(config=model.config))
    for handle in handles:
        handle.remove()
    # budget 1.0 keeps all: select returns None but the layer states were recorded
    for layer, state in zip(model.model.layers, policy.states):
        q = state.queries(PROMPT_LENGTH - 6, PROMPT_LENGTH).double()  # [1, 6, 6, 8]
        k = state.keys.double().repeat_interleave(3, dim=1)
        v = state.values.double().repeat_interleave(3, dim=1)
        logits = 0.37 * q @ k.transpose(-1, -2)
        causal = torch.arange(PROMPT_LENGTH)[None, :] > torch.arange(PROMPT_LENGTH - 6, PROMPT_LENGTH)[:, None]
        out = logits.masked_fill(causal, float("-inf")).softmax(-1) @ v  # [1, Hq, 6, d]
        actual = captured[layer.self_attn.o_proj][:, -6:].view(1, 6, 6, 8).transpose(1, 2)
        torch.testing.assert_close(out.float(), actual, atol=1e-5, rtol=1e-4)


def test_captured_outputs_equal_recomputed_in_float64(family):
    """The o_proj inputs the hooks hand to the scores are softmax(z) v over the full causal prefix."""
    model = tiny_model(family).double()
    policy = Recording.wrap(SnapKV(budget=1.0, window=6, score="obc-joint"))
    with policy.attach(model), torch.no_grad():
        model(input_ids=prompt(batch=2), past_key_values=EvictableCache(config=model.config))
    for state in policy.states:
        assert state.outputs is not None
        q, outputs = state.window(PROMPT_LENGTH - 6, PROMPT_LENGTH)
        k = state.keys.repeat_interleave(3, dim=1)
        v = state.values.repeat_interleave(3, dim=1)
        causal = torch.arange(PROMPT_LENGTH)[None, :] > torch.arange(PROMPT_LENGTH - 6, PROMPT_LENGTH)[:, None]
        expected = (state.scaling * q @ k.transpose(-1, -2)).masked_fill(causal, float("-inf")).softmax(-1) @ v
        torch.testing.assert_close(outputs, expected, rtol=1e-10, atol=1e-12)


def test_eviction_with_captured_outputs_keeps_the_same_tokens(family):
    """Hooks (captured o) and a policy fed recomputed o choose the same tokens."""
    model = tiny_model(family)
    policy = Recording.wrap(SnapKV(budget=0.3, window=6, score="obc-joint"))
    with policy.attach(model), torch.no_grad():
        model(input_ids=prompt(batch=2), past_key_values=EvictableCache(config=model.config))
    for state, chosen in zip(policy.states, policy.chosen):
        recomputed = LayerState(state.keys, state.values, state.scaling, state.query_heads, state.key_mask, state.queries)
        assert torch.equal(policy.policy.select(recomputed), chosen)


# ---------------------------------------------------------------- generation


def greedy(model, ids, steps, attention_mask=None):
    return model.generate(
        input_ids=ids, attention_mask=attention_mask, max_new_tokens=steps, do_sample=False, pad_token_id=0
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_budget_generation_matches_plain_generate(family, attn):
    model = tiny_model(family, attn=attn)
    ids = prompt()
    plain = greedy(model, ids, 8)
    with SnapKV(budget=1.0, window=4, score="obc-joint").attach(model):
        hooked = greedy(model, ids, 8)
    assert torch.equal(plain, hooked)


def test_hooks_are_removed_on_exit():
    model = tiny_model()
    with H2O(budget=5, window=2).attach(model):
        pass
    out = model(input_ids=prompt(), use_cache=True)
    assert type(out.past_key_values) is DynamicCache
    assert out.past_key_values.get_seq_length() == PROMPT_LENGTH


# ---------------------------------------------------------------- against the masked full-cache reference


def left_padded_pair(pad: int = 9):
    """A batch of 2: a full row and a row with `pad` left-padding tokens, and its attention mask."""
    long, short = prompt(length=PROMPT_LENGTH, seed=2)[0], prompt(length=PROMPT_LENGTH - pad, seed=3)[0]
    ids = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask


def assert_matches_reference(model, policy, ids, steps=6, attention_mask=None):
    """Evicted generation == the full cache hiding exactly what each KV head dropped: tokens, and logits."""
    recording = Recording.wrap(policy)
    with recording.attach(model):
        tokens, logits, cache = generate_with_logits(model, ids, steps, attention_mask)
    reference_tokens, reference_logits = masked_reference(
        model, ids, steps, keep_masks_dropped(recording.chosen), attention_mask
    )
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)
    _, full_logits, _ = generate_with_logits(model, ids, steps, attention_mask)
    assert not torch.allclose(logits, full_logits, atol=1e-3)  # eviction changed the outputs: the test has teeth
    return recording, cache


def test_tokens_after_eviction_get_true_positions(family):
    """Evicted cache + true positions == full cache with the dropped tokens masked out."""
    model = tiny_model(family)
    assert_matches_reference(model, SnapKV(budget=12, window=4, score="obc-joint"), prompt())


def test_evicted_logits_match_masked_reference_step_by_step():
    """Driving the model by hand (no generate): positions filled in by the hooks, logits as the reference."""
    model = tiny_model()
    ids = prompt()
    recording = Recording.wrap(H2O(budget=10, window=4, score="obc-value"))
    cache = EvictableCache(config=model.config)
    steps, tokens, logits = 5, [], []
    with recording.attach(model), torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        for _ in range(steps):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            out = model(input_ids=token, past_key_values=cache)
    assert cache.get_seq_length() == PROMPT_LENGTH + steps
    assert cache.kept_tokens() == [10 + steps] * 2
    reference_tokens, reference_logits = masked_reference(model, ids, steps, keep_masks_dropped(recording.chosen))
    assert torch.equal(torch.cat(tokens, 1), reference_tokens[:, PROMPT_LENGTH:])
    torch.testing.assert_close(torch.stack(logits, 1), reference_logits, rtol=1e-4, atol=1e-4)


MODES = {
    "shared": lambda: SnapKV(budget=12, window=4, score="obc-joint", selection="shared"),
    "chunk": lambda: H2O(budget=14, window=4, score="obc-key", chunk=3),
    "shared-chunk": lambda: TOVA(budget=10, score="obc-value", selection="shared", chunk=4),
    "adakv": lambda: AdaKV(SnapKV(budget=12, window=4, score="obc-joint"), alpha=0.2),
    "adakv-chunk": lambda: AdaKV(H2O(budget=12, window=2, score="attention", chunk=2), alpha=0.5),
    "pyramid": lambda: PyramidKV(SnapKV(budget=12, window=4, score="obc-key"), beta=2),
    "adakv-pyramid": lambda: AdaKV(PyramidKV(TOVA(budget=0.3, score="obc-joint"), beta=3)),
    "global": lambda: GlobalKV(SnapKV(budget=12, window=4, score="obc-key", chunk=2), alpha=0.2),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_mode_matches_the_masked_reference(family, mode, attn):
    """Uniform and ragged layouts, batch 2 with left padding, sdpa and eager, every family."""
    model = tiny_model(family, attn=attn)
    ids, mask = left_padded_pair()
    recording, cache = assert_matches_reference(model, MODES[mode](), ids, attention_mask=mask)
    if mode.startswith("adakv") or mode == "global":
        assert any(cache.is_ragged(i) for i in range(2))


def test_left_padded_batch_matches_rows_alone(family):
    model = tiny_model(family)
    ids, mask = left_padded_pair()
    long, short = ids[0], ids[1, 9:]
    # full budget: identical to plain generate on the padded batch
    plain = greedy(model, ids, 6, mask)
    with H2O(budget=1.0, window=4, score="obc-key").attach(model):
        assert torch.equal(greedy(model, ids, 6, mask), plain)
    # real eviction: each row as if alone (same token budget)
    policy = H2O(budget=14, window=4, score="obc-joint")
    with policy.attach(model):
        batched = greedy(model, ids, 6, mask)
        alone_long = greedy(model, long[None], 6)
        alone_short = greedy(model, short[None], 6)
    assert torch.equal(batched[0, PROMPT_LENGTH:], alone_long[0, PROMPT_LENGTH:])
    assert torch.equal(batched[1, PROMPT_LENGTH:], alone_short[0, PROMPT_LENGTH - 9 :])


def test_padding_is_never_kept_over_real_tokens():
    model = tiny_model()
    ids = prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0  # row 1 has only 10 real tokens, fewer than the budget
    policy = Recording.wrap(SnapKV(budget=14, window=4, score="attention"))
    cache = EvictableCache(config=model.config)
    with policy.attach(model), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    for chosen in policy.chosen:  # row 1 keeps its 10 real tokens (30..39), no padding slot; row 0 keeps 14
        assert chosen[1].sum(-1).tolist() == [10, 10] and bool(chosen[1, :, 30:].all())
        assert chosen[0].sum(-1).tolist() == [14, 14]
    assert cache.head_lengths(0).tolist() == [[14, 14], [10, 10]]
    assert [p.tolist() for p in cache.kept_positions(0)[1]] == [list(range(10))] * 2  # counted from the first real token


def test_tova_and_h2o_full_history_run_on_every_family(family):
    model = tiny_model(family)
    for policy in (TOVA(budget=8, score="obc-joint"), H2O(budget=8, window=2, full_history=True, chunk_elements=64)):
        cache = EvictableCache(config=model.config)
        with policy.attach(model), torch.no_grad():
            model(input_ids=prompt(), past_key_values=cache)
        assert cache.kept_tokens() == [8, 8]


# ---------------------------------------------------------------- bad input, before any work


def test_right_padding_is_rejected_before_work():
    model = tiny_model()
    ids = prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0
    with H2O(budget=10, window=2).attach(model), pytest.raises(ValueError, match="left padding"):
        model(input_ids=ids, attention_mask=mask)


def test_context_shorter_than_window_is_rejected():
    model = tiny_model()
    with SnapKV(budget=0.5, window=64).attach(model), pytest.raises(ValueError, match="shorter than the policy's query window"):
        model(input_ids=prompt())


def test_budget_below_protected_tokens_is_rejected():
    model = tiny_model()
    with SnapKV(budget=3, window=8).attach(model), pytest.raises(ValueError, match="protected"):
        model(input_ids=prompt())


@pytest.mark.parametrize("options,refusal", [
    ({"num_beams": 2}, "not beam search"),
    ({"num_beams": 2, "do_sample": True}, "not beam sample"),
    ({"prompt_lookup_num_tokens": 3}, "not assisted generation"),
    ({"cache_implementation": "static"}, "cache_implementation='static'"),
])
def test_generation_modes_that_reorder_crop_or_replace_the_cache_are_refused_before_work(options, refusal):
    model = tiny_model()
    forwards = []
    handle = model.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with SnapKV(budget=12, window=4).attach(model), pytest.raises(ValueError, match=refusal):
        model.generate(prompt(), max_new_tokens=3, pad_token_id=0, **options)
    handle.remove()
    assert not forwards  # no prefill, no eviction
    assert "generate" not in model.__dict__  # the check leaves with the attach


def test_a_cache_of_another_kind_is_named_for_what_it_holds():
    from transformers import StaticCache

    model = tiny_model()
    static = StaticCache(config=model.config, max_cache_len=64)
    with SnapKV(budget=12, window=4).attach(model), pytest.raises(TypeError, match="got an empty StaticCache"):
        model(input_ids=prompt(), past_key_values=static)


def test_unsupported_model_family_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    from obcache.models import UnsupportedModelError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        SnapKV().attach(model)


@pytest.mark.parametrize("make", [lambda: SnapKV(budget=12, window=4, score="obc-joint"),
                                  lambda: AdaKV(SnapKV(budget=12, window=4, score="obc-joint"))])
def test_one_prefill_serves_many_policies_via_subset(make):
    """Recording choices on a full prefill and taking `subset` equals evicting inside the prefill."""
    model = tiny_model()
    ids = prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    policy = Recording.wrap(make())
    evicted = EvictableCache(config=model.config)
    with policy.attach(model), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=evicted)
    full = EvictableCache(config=model.config)
    with obcache.attach(model), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=full)
    subset = full.subset(policy.chosen)
    assert subset.get_seq_length() == evicted.get_seq_length() == PROMPT_LENGTH
    for i, (a, b) in enumerate(zip(subset.layers, evicted.layers)):
        assert type(a) is type(b)
        assert all(torch.equal(x, y) for x, y in zip(a.grid(), b.grid()))  # keys, values, validity, positions
        assert subset.kept_positions(i)[0][1].tolist() == evicted.kept_positions(i)[0][1].tolist()
