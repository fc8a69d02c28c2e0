"""Model-family adapters and model facts: queries, RoPE moves, heads, positions, tensor parallelism.

Eviction needs the post-RoPE queries of a window of prompt positions. obcache's
attention function captures the ones the model computes; where it did not run
(a forward outside it), they are rebuilt from the attention module's input
hidden states, exactly as the module's own forward does it. Each supported
family registers one small adapter here; nothing else in the library knows
about model classes.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from obcache.compat import tensor_parallel_mesh, tensor_parallel_size


class UnsupportedModelError(ValueError):
    """The model's family or attention layout cannot be evicted by obcache."""


@dataclass(frozen=True)
class FamilyAdapter:
    """How one model family computes its queries.

    `query_norm` is the name of a per-head norm applied to queries before RoPE
    (Qwen3's `q_norm`), or None. `output_projection` names the linear layer
    whose input is the per-head attention output, heads side by side
    ([B, q, Hq * d], query head h in columns h*d:(h+1)*d); None if the family
    has no such layer (the scores then recompute the outputs).
    """

    query_norm: str | None = None
    output_projection: str | None = "o_proj"

    def queries(
        self, attention: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Post-RoPE queries [B, Hq, W, d] of hidden states [B, W, hidden]."""
        batch, width, _ = hidden_states.shape
        q = attention.q_proj(hidden_states).view(batch, width, -1, attention.head_dim)
        if self.query_norm is not None:
            q = getattr(attention, self.query_norm)(q)
        q = q.transpose(1, 2)
        rotate = _rotary_function(attention)
        q, _ = rotate(q, q, cos, sin)
        return q

    def rotate(self, attention: nn.Module, rotary_emb: nn.Module, x: torch.Tensor, offset: int) -> torch.Tensor:
        """Post-RoPE vectors [B, H, W, d] moved `offset` positions later (RoPE rotations compose; exact
        for RoPE without attention scaling)."""
        if getattr(rotary_emb, "attention_scaling", 1.0) != 1.0:
            raise UnsupportedModelError("moving queries to other positions needs RoPE without attention scaling")
        cos, sin = rotary_emb(x, torch.tensor([[offset]], device=x.device))
        rotated, _ = _rotary_function(attention)(x, x, cos.to(x.dtype), sin.to(x.dtype))
        return rotated


FAMILIES: dict[str, FamilyAdapter] = {
    "llama": FamilyAdapter(),
    "mistral": FamilyAdapter(),
    "qwen2": FamilyAdapter(),
    "qwen3": FamilyAdapter(query_norm="q_norm"),
}


def _rotary_function(attention: nn.Module) -> Callable:
    """The model file's own `apply_rotary_pos_emb`, so RoPE variants stay exact."""
    module = sys.modules[type(attention).__module__]
    return module.apply_rotary_pos_emb


def check_supported_config(config) -> FamilyAdapter:
    """Return the family adapter for a transformers config, or raise a clear error.

    Rejected: families without an adapter, and models with sliding-window
    attention layers (their cache drops tokens on its own).
    """
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model family {model_type!r} is not supported; supported families: {', '.join(sorted(FAMILIES))}"
        )
    layer_types = getattr(text_config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types) or (
        not layer_types and getattr(text_config, "sliding_window", None) is not None
    ):
        raise UnsupportedModelError(
            f"{model_type} model with sliding-window attention layers is not supported; "
            "obcache evicts full-attention caches only (set sliding_window=None / use_sliding_window=False)"
        )
    return FAMILIES[model_type]


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a decoder model, in layer order."""
    layers = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
    if not layers:
        raise UnsupportedModelError(f"no attention layers with q_proj/layer_idx found in {type(model).__name__}")
    return sorted(layers, key=lambda m: m.layer_idx)


def check_attention_implementation(model: nn.Module) -> None:
    """Only attention implementations that take the standard 4-D/2-D masks are supported, and one attach at a
    time."""
    implementation = model.config._attn_implementation
    if implementation.startswith("obcache-"):
        raise RuntimeError(
            "obcache is already attached to this model (nested `attach`); "
            "use one `with policy.attach(model):` block at a time"
        )
    if implementation not in ("sdpa", "eager"):
        raise UnsupportedModelError(
            f"attention implementation {implementation!r} is not supported; use 'sdpa' (default) or 'eager'"
        )


def position_limit(config) -> int | None:
    """The positions the model was built for (`max_position_embeddings` of its text config), or None if unknown."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text_config, "max_position_embeddings", None)


def head_dim(config) -> int:
    """The model's attention head dimension (of its text config)."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def kv_heads(config) -> int:
    """The model's KV heads (all of them, over every tensor-parallel rank)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def layers_and_kv_heads(model: nn.Module) -> tuple[int, int]:
    """(layers, KV heads) of `model`: this rank's heads when it is split by tensor parallelism."""
    config = model.config.get_text_config()
    return config.num_hidden_layers, kv_heads(config) // tensor_parallel_ranks(model)


def fingerprint(model: nn.Module) -> str:
    """A short hash that tells models apart: their architecture and a strided sample of every parameter (this
    rank's shard under tensor parallelism). Two models of the same shape but other weights differ."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, parameter in model.named_parameters():
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        flat = local.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        digest.update(f"{name}:{tuple(local.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def tensor_parallel_ranks(model: nn.Module) -> int:
    """Over how many ranks transformers split `model` by tensor parallelism (1 if not split)."""
    return tensor_parallel_size(model)


def tensor_parallel_group(model: nn.Module):
    """The torch.distributed process group over which transformers split `model` by tensor parallelism
    (`distributed_config=DistributedConfig(tp_size=N)`, or `obcache.load_model(tp_size=N)`); None if not split.
    Give it to the policy (`SnapKV(..., group=...)`) so that ranks agree on choices across heads."""
    if tensor_parallel_ranks(model) <= 1:
        return None
    return tensor_parallel_mesh(model).get_group()
