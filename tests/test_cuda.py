"""On a CUDA device: the same results as on the CPU (to float32 / bf16 tolerance). Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import obcache
from obcache import AdaKV, EvictableCache, SnapKV, saliency
from tests.conftest import tiny_model
from tests.test_eviction import Recording, prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KINDS = ["attention", "obc-value", "obc-key", "obc-joint", "exact-removal"]


@pytest.mark.parametrize("kind", KINDS)
def test_scores_match_cpu(kind):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 16, 64, generator=generator)  # 9 query heads, window 16
    k = torch.randn(2, 3, 300, 64, generator=generator)  # 3 KV heads, 300 tokens
    v = torch.randn(2, 3, 300, 64, generator=generator)
    cpu = saliency(q, k, v, kind, scaling=0.125)
    gpu = saliency(q.cuda(), k.cuda(), v.cuda(), kind, scaling=0.125)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)
    half = saliency(q.cuda().bfloat16(), k.cuda().bfloat16(), v.cuda().bfloat16(), kind, scaling=0.125)
    assert half.dtype == torch.float32
    relative = (half.cpu() - cpu).norm() / cpu.norm()
    assert relative < 0.1  # bf16 inputs carry ~3 significant digits


class Replay:
    """Keeps the masks another run chose (one per layer, in order)."""

    name = "replay"

    def __init__(self, masks):
        self.masks = list(masks)

    def check_prompt(self, lengths):
        pass

    def select(self, layer):
        return self.masks.pop(0).to(layer.keys.device)

    def attach(self, model):
        return obcache.attach(model, self)


def test_eviction_and_decoding_match_cpu(family):
    """Scores agree to float tolerance; from the same kept set, logits after eviction agree."""
    ids, continuation = prompt(), prompt(length=6, seed=9)
    runs = {}
    for device in ("cpu", "cuda"):
        model = tiny_model(family).to(device)
        recording = Recording.wrap(SnapKV(budget=12, window=4, score="obc-joint"))
        with recording.attach(model), torch.no_grad():
            model(input_ids=ids.to(device), past_key_values=EvictableCache())
        scores = [recording.policy.token_scores(state).cpu() for state in recording.states]
        chosen = [mask.cpu() for mask in recording.chosen]
        cache = EvictableCache()
        with Replay(runs["cpu"]["chosen"] if device == "cuda" else chosen).attach(model), torch.no_grad():
            model(input_ids=ids.to(device), past_key_values=cache)
            logits = model(input_ids=continuation.to(device), past_key_values=cache).logits.cpu()
        runs[device] = {"chosen": chosen, "scores": scores, "logits": logits}
    for cpu_scores, gpu_scores in zip(runs["cpu"]["scores"], runs["cuda"]["scores"]):
        torch.testing.assert_close(gpu_scores, cpu_scores, rtol=1e-2, atol=1e-4)
    for cpu_mask, gpu_mask in zip(runs["cpu"]["chosen"], runs["cuda"]["chosen"]):
        assert (cpu_mask & gpu_mask).sum() >= 0.8 * cpu_mask.sum()  # top-k may flip near-ties
    torch.testing.assert_close(runs["cuda"]["logits"], runs["cpu"]["logits"], rtol=1e-2, atol=1e-2)


def test_bf16_cache_shrinks_on_cuda():
    model = tiny_model().to("cuda", torch.bfloat16)
    cache = EvictableCache(config=model.config)
    with SnapKV(budget=10, window=4, score="obc-joint").attach(model), torch.no_grad():
        model(input_ids=prompt().cuda(), past_key_values=cache)
    assert cache.kept_tokens() == [10, 10]
    assert cache.layers[0].keys.dtype == torch.bfloat16 and cache.layers[0].keys.is_cuda


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_paged_decode_step_matches_softmax_per_segment(dtype):
    """One decoding step over a paged layer on CUDA (one batched computation over the pool) vs float32 math per
    segment, in every dtype."""
    from obcache.attention import decode_blocks
    from obcache.layouts import UniformLayer

    generator = torch.Generator().manual_seed(0)
    batch, heads, group, length, dim = 2, 3, 3, 40, 64
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    values = torch.randn(batch, heads, length, dim, generator=generator)
    keep = torch.rand(batch, heads, length, generator=generator) < torch.tensor([0.2, 0.5, 0.9])[None, :, None]
    keep[..., -1] = True
    layer = UniformLayer()
    layer.update(keys.cuda().to(dtype), values.cuda().to(dtype))
    paged = layer.keep(keep.cuda())
    query = torch.randn(batch, heads * group, 1, dim, generator=generator)
    out = decode_blocks(query.cuda().to(dtype), paged.block_sets(dtype), heads, 0.125)
    expected = torch.empty(batch, 1, heads * group, dim)
    for b in range(batch):
        for h in range(heads):
            k, v = keys[b, h][keep[b, h]], values[b, h][keep[b, h]]
            q = query[b, h * group : (h + 1) * group, 0]  # [G, d]
            expected[b, 0, h * group : (h + 1) * group] = (0.125 * q @ k.T).softmax(-1) @ v
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tolerance, atol=tolerance)


def test_adakv_generation_on_cuda_matches_the_cpu(family):
    """Head-adaptive budgets in the paged layout: the same tokens on CUDA (float32) as on the CPU."""
    outputs = {}
    for device in ("cpu", "cuda"):
        model = tiny_model(family).to(device)
        with AdaKV(SnapKV(budget=12, window=4, score="obc-joint")).attach(model):
            outputs[device] = model.generate(prompt().to(device), max_new_tokens=6, do_sample=False,
                                             pad_token_id=0).cpu()
    assert torch.equal(outputs["cpu"], outputs["cuda"])
