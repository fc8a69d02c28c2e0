"""What differs between the transformers releases obcache supports (pyproject.toml's range), in one place.

Each difference is found from the installed transformers itself (a forward's
signature, an attribute), never from its version string:

- the KV cache keyword of a model's forward: `past_key_values` up to 5.23,
  `cache` from 5.24 (which still accepts the old name with a FutureWarning,
  removal announced for 5.40, but ignores it when both are given);
- where a model split by tensor parallelism records its degree and mesh:
  5.16 leaves `model.tp_size` None (only `config.distributed_config` has the
  degree); `model._device_mesh` is the tensor-parallel mesh itself up to 5.18,
  a ("pp", "fsdp", "tp") mesh from 5.19.

The rest of obcache reads and passes caches and meshes through these functions only.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

from torch import nn

CACHE_KEYWORDS = ("cache", "past_key_values")  # the current name first


@lru_cache(maxsize=None)
def _keyword_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cache_keyword(module: nn.Module) -> str:
    """The keyword under which `module`'s forward takes the KV cache: "cache" or "past_key_values"."""
    return _keyword_of(type(module).forward)


def cache_argument(module: nn.Module, cache) -> dict:
    """`{keyword: cache}` for calling `module` (a model, its decoder, an attention layer): `module(..., **this)`."""
    return {cache_keyword(module): cache}


def given_cache(kwargs: dict):
    """The KV cache in a forward's keyword arguments, under either name (None if none)."""
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def put_cache(kwargs: dict, module: nn.Module, cache) -> None:
    """Put `cache` into the keyword arguments of a forward of `module` under the name it takes (the other dropped)."""
    for name in CACHE_KEYWORDS:
        kwargs.pop(name, None)
    kwargs[cache_keyword(module)] = cache


def tensor_parallel_size(model: nn.Module) -> int:
    """Over how many ranks transformers split `model` by tensor parallelism (1 if not split)."""
    size = getattr(model, "tp_size", None)
    if size is None:  # 5.16: only the config records it
        size = getattr(getattr(model.config, "distributed_config", None), "tp_size", None)
    return size or 1


def tensor_parallel_mesh(model: nn.Module):
    """The device mesh over which transformers split `model` by tensor parallelism."""
    mesh = model._device_mesh
    return mesh["tp"] if mesh.ndim > 1 else mesh  # up to 5.18 the model holds the tensor-parallel mesh itself
