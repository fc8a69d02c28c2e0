"""KVzip: the context-reconstruction queries, the kept set, several questions on one compressed cache.

Every check compares with an independent computation: the reconstruction's
queries and attention outputs are rebuilt in float64 from the model's weights
(one plain forward over context + reconstruction input, hand-written
attention); the scores come from the perturbation brute force of
test_scores; generation after eviction from the full-cache masked reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import obcache
from obcache import AdaKV, Decoding, GlobalKV, KVzip, KVzipHeads, KVzipReplay, SnapKV
from obcache.after_prefill import replay_scores
from obcache.cache import EvictableCache
from obcache.fanout import shared_prefill
from obcache.generation import forward_tokens
from obcache.policies.kvzip.prompts import FIRST_PROMPT, NEXT_PROMPT, OVERLAP, answer_header, reconstruction_inputs
from obcache.text import document_ids
from tests.conftest import tiny_model
from tests.reference import generate_with_logits, keep_masks_dropped, masked_reference
from tests.test_scores import brute_force

CONTEXT = 40
CHUNK = 16  # three reconstruction chunks of the 40-token context


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def context_ids(length: int = CONTEXT, seed: int = 5) -> list[int]:
    return torch.randint(10, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class Capture:
    """A stand-in replay for `replay_scores`: records each layer's reconstruction state, scores nothing."""

    def __init__(self):
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def replay_scoring(self):
        return "capture"

    def replay_scores(self, layer, context_length):
        self.seen.append((layer.layer_idx, layer.new_queries().clone(), layer.new_outputs().clone(),
                          layer.new_log_normalizers))
        return torch.zeros(1, layer.kv_heads, context_length)

    def merge(self, total, scores):
        return scores


def reference_states(model, context: list[int], inputs: list[int]) -> list[dict]:
    """Per layer, float64: queries, keys, values and attention outputs of one plain forward over context + inputs."""
    model = copy.deepcopy(model).double()
    ids = torch.tensor([context + inputs])
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    positions = torch.arange(ids.shape[1])[None]
    cos, sin = model.model.rotary_emb(hidden[0], positions)
    states = []
    for index, block in enumerate(model.model.layers):
        attention = block.self_attn
        x = block.input_layernorm(hidden[index])

        def heads(projection, norm=None):
            y = projection(x).view(1, ids.shape[1], -1, attention.head_dim)
            return (norm(y) if norm is not None else y).transpose(1, 2)

        q = heads(attention.q_proj, getattr(attention, "q_norm", None))
        k = heads(attention.k_proj, getattr(attention, "k_norm", None))
        v = heads(attention.v_proj)
        rotate = lambda t: t * cos[:, None] + torch.cat([-t[..., t.shape[-1] // 2:], t[..., : t.shape[-1] // 2]], -1) * sin[:, None]  # noqa: E731
        q, k = rotate(q), rotate(k)
        group = q.shape[1] // k.shape[1]
        logits = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * attention.scaling
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
        weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        states.append({"q": q, "k": k, "v": v, "o": weights @ v.repeat_interleave(group, 1),
                       "lse": logits.masked_fill(~causal, float("-inf")).logsumexp(-1)})
    return states


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_reconstruction_queries_outputs_and_normalizers_equal_float64_recomputation(tokenizer, family):
    model = tiny_model(family, vocab_size=len(tokenizer))
    context = context_ids()
    inputs = reconstruction_inputs(tokenizer, context, chunk=CHUNK)
    assert len(inputs) == 3
    cache = EvictableCache(config=model.config)
    capture = Capture()
    with obcache.attach(model) as engine, torch.no_grad():
        forward_tokens(model, cache, context)
        replay_scores(engine, cache, inputs, {"capture": capture})
    assert cache.seen_tokens == CONTEXT and cache.layers[0].keys.shape[-2] == CONTEXT  # nothing of it kept
    for chunk, ids in enumerate(inputs):
        reference = reference_states(model, context, ids)
        for layer in range(2):
            layer_idx, queries, outputs, normalizers = capture.seen[chunk * 2 + layer]
            assert layer_idx == layer
            torch.testing.assert_close(queries.double(), reference[layer]["q"][:, :, CONTEXT:], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(outputs.double(), reference[layer]["o"][:, :, CONTEXT:], rtol=1e-4, atol=1e-5)
            # the softmax denominators the CPU kernel gave, over the context and the chunk's own tokens so far
            torch.testing.assert_close(normalizers.double(), reference[layer]["lse"][:, :, CONTEXT:], rtol=1e-5, atol=1e-5)


def test_reconstruction_inputs_repeat_the_context_in_chunks(tokenizer):
    context = context_ids()
    inputs = reconstruction_inputs(tokenizer, context, chunk=CHUNK)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    header = encode(answer_header(tokenizer))
    chunks = [context[:16], context[16:32], context[32:]]
    assert inputs[0] == encode(FIRST_PROMPT) + header + chunks[0]
    for i in (1, 2):
        assert inputs[i] == encode(NEXT_PROMPT) + chunks[i - 1][-OVERLAP:] + header + chunks[i]
    assert "assistant" in tokenizer.decode(header)  # the answer starts where the model's own answers do


def brute_force_reconstruction_scores(model, context: list[int], inputs: list[list[int]], score: str,
                                      aggregate: str) -> list[torch.Tensor]:
    """Per layer [1, Hkv, len(context)]: the float64 perturbation brute force of `score` over each chunk's
    reconstruction queries, merged over the chunks by `aggregate`."""
    length, expected = len(context), [None] * len(model.model.layers)
    for ids in inputs:
        reference = reference_states(model, context, ids)
        for layer, r in enumerate(reference):
            scores = brute_force(r["q"][:, :, length:], r["k"], r["v"], score,
                                 positions=list(range(length, length + len(ids))), reduce=aggregate)[..., :length]
            merged = expected[layer]
            expected[layer] = scores if merged is None else (merged + scores if aggregate == "sum" else torch.maximum(merged, scores))
    return expected


@pytest.mark.parametrize("score,aggregate", [("attention", "max"), ("obc-key", "max"), ("obc-joint", "sum")])
def test_kept_set_equals_brute_force_top_k_of_the_documented_score(tokenizer, score, aggregate):
    """Per layer and KV head: keep = the 4 sinks + the top (budget - 4) of the score, aggregated over every
    reconstruction query of every chunk (float64 brute force per chunk, merged by max or sum)."""
    model = tiny_model(vocab_size=len(tokenizer))
    context = context_ids()
    inputs = reconstruction_inputs(tokenizer, context, chunk=CHUNK)
    budget = 15
    policy = KVzip(score=score, aggregate=aggregate, budget=budget, reconstruct_chunk=CHUNK, allocation="uniform")
    shared = shared_prefill(model, context, {"kvzip": policy}, tokenizer=tokenizer)
    expected = brute_force_reconstruction_scores(model, context, inputs, score, aggregate)
    for layer in range(2):
        scores = expected[layer].clone()
        scores[..., :4] = float("inf")  # sinks
        top = scores.topk(budget, dim=-1).indices.sort(-1).values
        chosen = shared.masks["kvzip"][layer].nonzero()[:, -1].view(1, 2, budget)
        assert torch.equal(chosen, top), (layer, chosen, top)


def test_global_allocation_pools_every_head_of_every_layer(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer))
    policy = GlobalKV(KVzip(score="attention", budget=12), alpha=0.25)
    shared = shared_prefill(model, context_ids(), {"g": policy}, tokenizer=tokenizer)
    counts = torch.stack([mask.sum(-1) for mask in shared.masks["g"]])  # [layers, 1, Hkv]
    assert int(counts.sum()) == 12 * 2 * 2  # budget x heads x layers
    assert int(counts.min()) >= max(4, 3)  # the 4 sinks, always kept; the floor ceil(0.25 x 12) counts them
    assert len(set(counts.flatten().tolist())) > 1  # really adaptive


def masks_of(cache: EvictableCache, length: int) -> list[torch.Tensor]:
    """Keep masks [1, Hkv, length] of the prompt positions each head holds."""
    masks = []
    for layer in range(len(cache.layers)):
        mask = torch.zeros(1, cache.layers[layer].keys.shape[1] if not cache.is_ragged(layer) else 2, length, dtype=torch.bool)
        for head, positions in enumerate(cache.kept_positions(layer)[0]):
            mask[0, head, positions[positions < length]] = True
        masks.append(mask)
    return masks


@pytest.mark.parametrize("make", [
    lambda: KVzip(score="obc-joint", budget=14, reconstruct_chunk=CHUNK),
    lambda: GlobalKV(KVzip(score="attention", budget=0.3, chunk=2)),
    lambda: AdaKV(KVzipReplay(score="obc-key", budget=12)),
    lambda: KVzipHeads(budget=0.5, ratings=torch.tensor([[1.0, 3.0], [2.0, 0.5]])),
])
def test_generation_after_kvzip_matches_the_masked_reference(tokenizer, family, make):
    """Under plain model.generate: tokens and logits equal the full cache hiding exactly what each head dropped."""
    model = tiny_model(family, vocab_size=len(tokenizer))
    ids = torch.tensor([context_ids()])
    with make().attach(model, tokenizer=tokenizer):
        tokens, logits, cache = generate_with_logits(model, ids, 6)
    assert cache.seen_tokens == CONTEXT + 5
    reference_tokens, reference_logits = masked_reference(model, ids, 6, keep_masks_dropped(masks_of(cache, CONTEXT)))
    assert torch.equal(tokens, reference_tokens)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)
    _, full_logits, _ = generate_with_logits(model, ids, 6)
    assert not torch.allclose(logits, full_logits, atol=1e-3)


def test_questions_on_one_compressed_cache_equal_each_on_its_own(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer))
    context = " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(12))
    questions = ["Where is item 3?", "Where is item 8?", "Which box holds item 11?"]
    policy = KVzip(score="obc-key", budget=0.4, reconstruct_chunk=64, allocation="uniform")
    first = obcache.generate(model, tokenizer, context, questions[0], policy=policy, max_new_tokens=6)
    shared = [first] + [obcache.ask(model, tokenizer, first, q, max_new_tokens=6) for q in questions[1:]]
    alone = [obcache.generate(model, tokenizer, context, q, policy=policy, max_new_tokens=6) for q in questions]
    assert [r.token_ids for r in shared] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in alone}) > 1  # different questions, different answers
    assert first.compressed.seen_tokens == first.context_tokens  # the compressed cache did not grow


def test_bad_input_is_rejected_before_any_work(tokenizer):
    with pytest.raises(ValueError, match="reconstruct_chunk must be an int >= 1"):
        KVzip(reconstruct_chunk=0)
    with pytest.raises(ValueError, match="unknown aggregation over queries 'mean'; allowed: sum, max"):
        KVzip(aggregate="mean")
    with pytest.raises(ValueError, match="unknown allocation 'adakv'; allowed: global, uniform"):
        KVzip(allocation="adakv")
    with pytest.raises(ValueError, match="too short to reconstruct; it needs at least 5"):
        KVzip(budget=2).check_prompt([3])
    with pytest.raises(ValueError, match="one context at a time"):
        KVzip().check_prompt([100, 100])
    with pytest.raises(ValueError, match="cannot score during decoding"):
        Decoding(KVzip(budget=0.5), capacity=64)
    with pytest.raises(ValueError, match="wrap the policy directly"):
        GlobalKV(AdaKV(SnapKV()))
    model = tiny_model(vocab_size=len(tokenizer))
    with pytest.raises(ValueError, match="needs the tokenizer"):
        KVzip().attach(model)
    with pytest.raises(ValueError, match="too short to reconstruct"), KVzip(budget=2).attach(model, tokenizer=tokenizer):
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=DynamicCache())


@pytest.mark.parametrize("score", ["attention", "obc-joint"])
def test_head_ratings_are_mean_reconstruction_scores_of_the_calibration_text(tokenizer, score):
    """KVzipHeads: a KV head's rating is the mean, after the sinks, of its float64 brute-force
    reconstruction scores (max over the chunks' queries) of the shipped calibration text."""
    model = tiny_model(vocab_size=len(tokenizer))
    policy = KVzipHeads(score=score, budget=0.5, calibration=CONTEXT, reconstruct_chunk=CHUNK)
    rated = obcache.calibrate(model, tokenizer, AdaKV(policy))
    ratings = rated.base.ratings
    assert policy.ratings is None and ratings.seconds > 0  # the policy is left as it was; the prepared one is rated
    text = document_ids(tokenizer, CONTEXT)
    inputs = reconstruction_inputs(tokenizer, text, chunk=CHUNK)
    expected = torch.stack([scores[0, :, 4:].mean(-1) for scores in
                            brute_force_reconstruction_scores(model, text, inputs, score, "max")])
    torch.testing.assert_close(ratings.scores.double(), expected, rtol=1e-4, atol=1e-7)
    assert obcache.calibrate(model, tokenizer, AdaKV(policy)).base.ratings is ratings  # once per model
    other = tiny_model(vocab_size=len(tokenizer), seed=3)
    again = obcache.calibrate(other, tokenizer, rated)  # another model is rated again
    assert again.base.ratings.model != ratings.model
    assert not torch.allclose(again.base.ratings.scores.double(), expected)


def test_ratings_fitted_on_one_model_are_refitted_or_refused_on_another_of_the_same_shape(tokenizer):
    """Issue 17 (10) / 18: head ratings are tied to the model they were fitted on (its fingerprint)."""
    first, second = (tiny_model(vocab_size=len(tokenizer), seed=seed) for seed in (0, 3))
    rated = obcache.calibrate(first, tokenizer, KVzipHeads(budget=0.5, calibration=CONTEXT, reconstruct_chunk=CHUNK))
    with pytest.raises(ValueError, match="fitted on another model"):
        rated.attach(second)  # no tokenizer to refit with: refused before any work
    with rated.attach(second, tokenizer=tokenizer) as engine:
        refitted = engine.policy.ratings
    assert refitted.model != rated.ratings.model and not torch.equal(refitted.scores, rated.ratings.scores)
    assert refitted.model == obcache.calibrate(second, tokenizer, rated).ratings.model


def test_head_level_keeps_whole_heads_in_rating_order(tokenizer):
    """Per layer (AdaKV): the better-rated head keeps every token; the other its sinks and its most recent
    tokens, with the layer's total conserved (budget x heads)."""
    model = tiny_model(vocab_size=len(tokenizer))
    ratings = torch.tensor([[1.0, 3.0], [2.0, 0.5]])
    policy = AdaKV(KVzipHeads(budget=24, ratings=ratings), alpha=0.25)
    shared = shared_prefill(model, context_ids(), {"h": policy}, tokenizer=tokenizer)
    for layer, mask in enumerate(shared.masks["h"]):
        best, other = int(ratings[layer].argmax()), int(ratings[layer].argmin())
        assert bool(mask[0, best].all())
        kept = mask[0, other].nonzero().flatten().tolist()
        rest = 24 * 2 - CONTEXT - 4
        assert kept == [0, 1, 2, 3] + list(range(CONTEXT - rest, CONTEXT)), (layer, kept)


def test_global_head_level_ranks_the_heads_of_all_layers_together(tokenizer):
    """GlobalKV over head ratings: no per-layer normalisation, so both heads of the better layer keep everything
    (96 slots: 2 x 40; of the 16 left, the sinks of the worst head, and the rest to the next-worst, most recent
    first). Per layer (AdaKV, or GlobalKV's normalisation) the worse layer would keep a whole head."""
    model = tiny_model(vocab_size=len(tokenizer))
    policy = KVzipHeads(budget=24, ratings=torch.tensor([[1.0, 3.0], [0.2, 0.1]]), alpha=0.0)
    masks = shared_prefill(model, context_ids(), {"g": policy}, tokenizer=tokenizer).masks["g"]
    assert [mask[0].sum(-1).tolist() for mask in masks] == [[CONTEXT, CONTEXT], [12, 4]]
    recent = [head.nonzero().flatten().tolist() for head in masks[1][0]]
    assert recent == [[0, 1, 2, 3] + list(range(CONTEXT - 8, CONTEXT)), [0, 1, 2, 3]]


def test_head_level_needs_ratings_and_an_allocation_between_heads_before_any_work(tokenizer):
    model = tiny_model(vocab_size=len(tokenizer))
    forwards = []
    model.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    with pytest.raises(ValueError, match="must rate this model's heads first .* needs the tokenizer"):
        KVzipHeads().attach(model)
    with pytest.raises(ValueError, match="rates whole heads: it needs the budget moved between heads"):
        KVzipHeads(allocation="uniform")  # the allocation error first (issue 17, 16)
    with pytest.raises(ValueError, match="calibration must be an int >= 5"):
        KVzipHeads(calibration=2)
    wrong = KVzipHeads(budget=0.5, ratings=torch.ones(3, 2))
    with pytest.raises(ValueError, match="ratings have shape \\(3, 2\\), but the model has 2 layers of 2 KV heads"):
        wrong.attach(model)  # refused at attach, not after layer 0's forward (issue 17, 13)
    assert not forwards
    assert KVzipHeads().check_prompt([50, 40]) is None  # no replay: batches are fine


@pytest.mark.parametrize("layout", ["earlier-then-causal", "padded"])
def test_attention_with_log_normalizers_equals_float64(layout):
    """The kernel path that also returns lse: the split one (every earlier slot, then the forward's own tokens
    causally) and the masked one (a padded slot), against softmax attention written out in float64."""
    from types import SimpleNamespace

    from obcache.attention import _flash_with_log_normalizers

    gen = torch.Generator().manual_seed(2)
    query, key, value = torch.randn(1, 6, 5, 8, generator=gen), torch.randn(1, 2, 12, 8, generator=gen), torch.randn(1, 2, 12, 8, generator=gen)
    mask = torch.ones(1, 1, 5, 12, dtype=torch.bool)
    mask[..., 7:] = torch.ones(5, 5, dtype=torch.bool).tril()
    if layout == "padded":
        mask[..., 2] = False
    out, lse = _flash_with_log_normalizers(SimpleNamespace(is_causal=True), query, key, value, mask, 0.35)
    k, v = key.double().repeat_interleave(3, 1), value.double().repeat_interleave(3, 1)
    logits = (query.double() @ k.transpose(-1, -2) * 0.35).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out.double(), (logits.softmax(-1) @ v).transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), logits.logsumexp(-1), rtol=1e-5, atol=1e-6)
