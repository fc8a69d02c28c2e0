"""obcache/compat.py: what differs between the supported transformers releases, checked on the one installed.

`.ci/run` runs the fast suite on the oldest and the newest allowed release too
(scripts/test_transformers_range.sh), so these run on both sides of each difference.
"""

from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

import obcache
from obcache import EvictableCache, GlobalKV, KVzip, KVzipHeads, SnapKV, compat
from obcache.bench.shapes import forward
from tests.conftest import tiny_model

CONTEXT = "The quick brown fox jumps over the lazy dog. " * 12


def test_the_cache_keyword_is_the_one_the_forwards_take(model):
    keyword = compat.cache_keyword(model)
    assert keyword in ("cache", "past_key_values")
    for module in (model, model.model, model.model.layers[0], model.model.layers[0].self_attn):
        assert compat.cache_keyword(module) == keyword
        assert keyword in inspect.signature(module.forward).parameters
    assert compat.cache_argument(model, "c") == {keyword: "c"}


@pytest.mark.parametrize("policy", [SnapKV(budget=0.3, window=8), GlobalKV(KVzip(score="attention", budget=0.3)),
                                    KVzipHeads(score="obc-key", budget=0.3, calibration=256)])
def test_the_library_passes_its_caches_under_the_current_keyword(model, tokenizer, policy):
    """No deprecated-keyword warning from obcache's own forwards: prefill, reconstruction, calibration, decoding."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*", category=FutureWarning)
        result = obcache.generate(model, tokenizer, CONTEXT, "What jumps?", policy=policy, max_new_tokens=3)
        forward(model, DynamicCache(), torch.tensor([[5, 6, 7]]))
    assert sum(result.kept_per_layer) < result.tokens_seen * len(result.kept_per_layer)


@pytest.mark.parametrize("how", ["current", "past_key_values", "positional"])
def test_a_decoder_given_its_cache_under_either_name_evicts_into_it(model, how):
    """Under attach, the decoder's cache reaches the attention layers whatever keyword the caller used
    (transformers >= 5.24 ignores `past_key_values` when `cache` is set too)."""
    ids = torch.randint(10, 500, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = EvictableCache()
    with SnapKV(budget=12, window=4).attach(model):
        if how == "positional":
            model.model(ids, None, None, cache)
        else:
            name = compat.cache_keyword(model.model) if how == "current" else how
            model.model(input_ids=ids, **{name: cache})
    assert cache.seen_tokens == 40 and cache.evicted_layers == {0, 1}
    assert cache.kept_tokens() == [12.0, 12.0]


class _Mesh:
    def __init__(self, names: tuple[str, ...]):
        self.ndim, self.names = len(names), names

    def __getitem__(self, name):
        return _Mesh((name,))


@pytest.mark.parametrize("model_size, config_size, expected", [(2, 2, 2), (None, 2, 2), (None, None, 1), (None, 1, 1)])
def test_the_tensor_parallel_degree_is_read_where_each_release_keeps_it(model_size, config_size, expected):
    """5.16 leaves `model.tp_size` None on a split model: the degree is then in `config.distributed_config`."""
    config = SimpleNamespace(distributed_config=SimpleNamespace(tp_size=config_size) if config_size else None)
    assert compat.tensor_parallel_size(SimpleNamespace(tp_size=model_size, config=config)) == expected


@pytest.mark.parametrize("names", [("tp",), ("pp", "fsdp", "tp")])
def test_the_tensor_parallel_mesh_is_the_tp_dimension_of_the_models_mesh(names):
    """Up to 5.18 the model holds the tensor-parallel mesh itself, from 5.19 a ("pp", "fsdp", "tp") mesh."""
    assert compat.tensor_parallel_mesh(SimpleNamespace(_device_mesh=_Mesh(names))).names == ("tp",)
