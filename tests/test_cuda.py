"""On a CUDA device: the same results as on the CPU (to float32 / bf16 tolerance). Skipped without a GPU."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from obcache import EvictableCache, SnapKV, saliency
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


@dataclass
class Replay(SnapKV):
    """Keeps the tokens another run chose (one entry per layer, in order)."""

    indices: list = field(default_factory=list, repr=False)

    def select(self, layer):
        return self.indices.pop(0).to(layer.keys.device)


def test_eviction_and_decoding_match_cpu(family):
    """Scores agree to float tolerance; from the same kept set, logits after eviction agree."""
    ids, continuation = prompt(), prompt(length=6, seed=9)
    runs = {}
    for device in ("cpu", "cuda"):
        model = tiny_model(family).to(device)
        recording = Recording(budget=12, window=4, score="obc-joint")
        with recording.attach(model), torch.no_grad():
            model(input_ids=ids.to(device), past_key_values=EvictableCache(config=model.config))
        scores = [recording.token_scores(state).cpu() for state in recording.states]
        cache = EvictableCache(config=model.config)
        replay = Replay(budget=12, window=4, indices=list(runs["cpu"]["chosen"] if device == "cuda" else recording.chosen))
        with replay.attach(model), torch.no_grad():
            model(input_ids=ids.to(device), past_key_values=cache)
            logits = model(input_ids=continuation.to(device), past_key_values=cache).logits.cpu()
        runs[device] = {"chosen": [i.cpu() for i in recording.chosen], "scores": scores, "logits": logits}
    for cpu_scores, gpu_scores in zip(runs["cpu"]["scores"], runs["cuda"]["scores"]):
        torch.testing.assert_close(gpu_scores, cpu_scores, rtol=1e-2, atol=1e-4)
    for cpu_indices, gpu_indices in zip(runs["cpu"]["chosen"], runs["cuda"]["chosen"]):
        overlap = (cpu_indices.unsqueeze(-1) == gpu_indices.unsqueeze(-2)).any(-1).float().mean()
        assert overlap >= 0.8  # top-k may flip near-ties
    torch.testing.assert_close(runs["cuda"]["logits"], runs["cpu"]["logits"], rtol=1e-2, atol=1e-2)


def test_bf16_cache_shrinks_on_cuda():
    model = tiny_model().to("cuda", torch.bfloat16)
    cache = EvictableCache(config=model.config)
    with SnapKV(budget=10, window=4, score="obc-joint").attach(model), torch.no_grad():
        model(input_ids=prompt().cuda(), past_key_values=cache)
    assert cache.kept_tokens() == [10, 10]
    assert cache.layers[0].keys.dtype == torch.bfloat16 and cache.layers[0].keys.is_cuda
