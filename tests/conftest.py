"""Shared fixtures: tiny random-weight models of every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_model(family: str = "llama", *, attn: str = "sdpa", vocab_size: int = 512, seed: int = 0):
    """A 2-layer random model with grouped-query attention (6 query heads, 2 KV heads)."""
    config_class, model_class = FAMILIES[family]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation=attn,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # sharper logits: greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer():
    """The real default tokenizer (SmolLM2's), loaded offline."""
    from obcache.loading import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny random model with the real tokenizer's vocabulary."""
    return tiny_model(vocab_size=len(tokenizer))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail loudly if anything tries to load real weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded here")

    monkeypatch.setattr("obcache.loading.load_model", refuse)


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """Sorted kept positions [B, H, k] of a keep mask [B, H, L] in which every head keeps k tokens."""
    batch, heads, _ = mask.shape
    return mask.nonzero()[:, -1].view(batch, heads, -1)
