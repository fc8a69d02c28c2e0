"""The model a benchmark measures (a real checkpoint, or random weights of a known shape) and its inputs.

Speed and memory do not depend on the weights' values, so `--random-weights`
lets a GPU machine be benchmarked without shipping checkpoints (and at a scale
the CPU cannot run); `tiny` runs the whole suite in seconds (a smoke test).
"""

from __future__ import annotations

import torch
from torch import nn

from obcache.compat import cache_argument

RANDOM_SHAPES: dict[str, dict] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                         tie_word_embeddings=False),
    # The attention of Llama-3.1-8B (32 layers, 32 query and 8 KV heads of 128 dims) around a small hidden size and
    # vocabulary: what a decoding step does with the cache is 8B-shaped, the rest is cheap enough for a CPU.
    "llama-3.1-8b-attention": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000,
                                   rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0, max_position_embeddings=4096,
                 tie_word_embeddings=False),
}

#: `bench --layouts`: the shape of the scale cell.
SCALE_SHAPE = "llama-3.1-8b-attention"


def load_benchmark_model(name: str | None, random_weights: str | None, attn: str, dtype: str | None,
                         device: str | torch.device | None) -> nn.Module:
    """A real checkpoint (`load_model`) or, with `random_weights`, a Llama of that shape (seeded)."""
    from obcache.loading import load_model, resolve_dtype

    if random_weights is None:
        return load_model(name, attn_implementation=attn, dtype=dtype, device=device)[0]
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = LlamaConfig(**RANDOM_SHAPES[random_weights], attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, device))
    return model.eval()


def prompt(length: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random prompt [1, length] (timing and memory do not depend on the text)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(min(100, vocab_size // 2), vocab_size - 1, (1, length), generator=generator).to(device)


def forward(model: nn.Module, cache, ids: torch.Tensor) -> torch.Tensor:
    """Feed `ids` [1, q] on top of `cache` (any transformers cache); the last position's logits [1, V]."""
    return model(input_ids=ids, **cache_argument(model, cache), use_cache=True, logits_to_keep=1).logits[:, -1]
