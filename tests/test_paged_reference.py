"""The paged layout against the independent masked full-cache reference (issue 19): batch 3 with left padding,
every mode, three families; continuation over three generate calls; 500 decode steps evicting every interval;
a pool that stops growing over 2000 decode steps."""

from __future__ import annotations

import pytest
import torch

from obcache import H2O, TOVA, AdaKV, Decoding, GlobalKV, KVzipHeads, PyramidKV, SnapKV, kernels
from tests.conftest import tiny_model
from tests.reference import keep_masks_dropped, masked_reference
from tests.test_decoding import decode_by_hand, dropped_as_recorded
from tests.test_eviction import PROMPT_LENGTH, Recording, prompt

MODES = {
    "per-head": lambda: SnapKV(budget=12, window=4, score="obc-joint"),
    "shared": lambda: SnapKV(budget=12, window=4, score="obc-key", selection="shared"),
    "chunk": lambda: H2O(budget=14, window=4, score="obc-key", chunk=3),
    "adakv": lambda: AdaKV(SnapKV(budget=0.35, window=4, score="obc-joint", chunk=2), alpha=0.2),
    "pyramid": lambda: AdaKV(PyramidKV(TOVA(budget=0.3, score="obc-key"), beta=3)),
    "global": lambda: GlobalKV(SnapKV(budget=12, window=4, score="obc-value"), alpha=0.2),
    "kvzip-heads": lambda: KVzipHeads(budget=0.4, sinks=2, ratings=torch.tensor([[1.0, 3.0], [2.0, 0.5]])),
}


def padded_three():
    """A batch of 3 rows padded on the left by 0, 5 and 11 tokens, and its attention mask."""
    rows = [prompt(length=PROMPT_LENGTH - pad, seed=20 + pad)[0] for pad in (0, 5, 11)]
    ids = torch.stack([torch.cat([torch.zeros(PROMPT_LENGTH - len(r), dtype=torch.long), r]) for r in rows])
    mask = (torch.arange(PROMPT_LENGTH)[None, :] >= torch.tensor([0, 5, 11])[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("mode", sorted(MODES))
def test_three_generate_calls_on_the_paged_layout_match_the_masked_reference(family, mode):
    """Evicted after the prompt, then continued in three generate calls: the tokens and logits of the full cache
    hiding exactly what each KV head dropped (batch 3, left padding)."""
    model = tiny_model(family)
    ids, mask = padded_three()
    recording = Recording.wrap(MODES[mode]())
    tokens, logits = [], []
    with recording.attach(model):
        sequences, cache = ids, None
        for _ in range(3):
            out = model.generate(input_ids=sequences, attention_mask=torch.ones_like(sequences).masked_fill(
                torch.arange(sequences.shape[1]) < (1 - mask).sum(-1, keepdim=True), 0), past_key_values=cache,
                max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
            sequences, cache = out.sequences, out.past_key_values
            logits.append(torch.stack(out.logits, 1))
    reference_tokens, reference_logits = masked_reference(model, ids, 12, keep_masks_dropped(recording.chosen), mask)
    assert torch.equal(sequences, reference_tokens)
    torch.testing.assert_close(torch.cat(logits, 1), reference_logits, rtol=1e-4, atol=1e-4)
    if mode in ("adakv", "pyramid", "global", "kvzip-heads"):
        assert not cache.layers[0].uniform  # the paged layout: heads of unequal length


@pytest.mark.parametrize("fused", [True, False], ids=["fused CPU kernel", "torch"])
def test_500_decode_steps_evicting_every_interval_match_the_masked_reference(fused, monkeypatch):
    """Decoding over AdaKV (paged): at every one of 500 steps, the full cache hiding what each head held not;
    with the fused CPU decoding kernel (`obcache.kernels`, the default where it builds) and the torch one."""
    if fused and not kernels.available():
        pytest.skip("no C compiler for the fused CPU kernel")
    monkeypatch.setenv("OBCACHE_CPU_KERNEL", "1" if fused else "0")
    model = tiny_model("qwen3")
    ids, mask = padded_three()
    policy = Decoding(AdaKV(SnapKV(budget=16, window=4, score="obc-key"), alpha=0.3), capacity=16, interval=8)
    tokens, logits, kept, cache = decode_by_hand(model, policy, ids, 500, mask)
    reference_tokens, reference_logits = masked_reference(model, ids, 500, dropped_as_recorded(kept), mask)
    assert torch.equal(tokens, reference_tokens[:, ids.shape[1]:])
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)
    assert not cache.layers[0].uniform
    for layer in range(len(cache.layers)):
        assert cache.head_lengths(layer).float().mean(-1).max() < 16 + 8


def test_the_pool_does_not_grow_over_2000_decode_steps():
    """Under Decoding, the blocks an eviction frees are taken again by later appends: the same pool throughout."""
    model = tiny_model()
    policy = Decoding(AdaKV(H2O(budget=24, window=4, score="obc-key"), alpha=0.2), capacity=24, interval=8)
    sizes = []
    with policy.attach(model), torch.no_grad():
        out = model(input_ids=prompt(length=64), logits_to_keep=1)
        cache = out.past_key_values
        for step in range(2000):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache)
            if step in (200, 1999):
                sizes.append([(len(layer.owner), layer.keys.nbytes()) for layer in cache.layers])
    assert sizes[0] == sizes[1]
    assert cache.get_seq_length() == 64 + 2000
