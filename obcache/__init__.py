"""obcache: KV-cache eviction with OBCache output-aware scores for Hugging Face transformers.

    import obcache
    model, tokenizer = obcache.load_model()          # SmolLM2-135M-Instruct, offline
    policy = obcache.recommended(budget=0.1)          # or e.g. obcache.AdaKV(obcache.SnapKV(score="obc-key"))
    result = obcache.generate(model, tokenizer, context, question, policy=policy)
    with policy.attach(model):                        # or evict inside model.generate
        model.generate(**inputs)
"""

from obcache.cache import EvictableCache
from obcache.fanout import SharedPrefill, shared_prefill
from obcache.generation import GenerationResult, ask, generate
from obcache.hooks import attach
from obcache.policies.kvzip import HeadRatings, calibrate
from obcache.loading import load_model, load_tokenizer
from obcache.models import tensor_parallel_group
from obcache.policies import (
    H2O, POLICIES, TOVA, AdaKV, Decoding, GlobalKV, KVzip, KVzipHeads, KVzipReplay, MixedPrecision, Policy, PyramidKV,
    Quantized, ScoredPolicy, Selector, SnapKV, StreamingLLM, build_policy, make_policy, paper_preset, recommended,
)
from obcache.scores import SCORE_KINDS, saliency

__version__ = "0.1.0"

__all__ = [
    "AdaKV", "Decoding", "EvictableCache", "GenerationResult", "GlobalKV", "H2O", "HeadRatings", "KVzip", "KVzipHeads",
    "KVzipReplay", "MixedPrecision", "POLICIES", "Policy", "PyramidKV", "Quantized", "SCORE_KINDS", "ScoredPolicy", "Selector", "SharedPrefill",
    "SnapKV", "StreamingLLM", "TOVA", "ask", "attach", "build_policy", "calibrate", "generate", "load_model",
    "load_tokenizer", "make_policy", "paper_preset", "recommended", "saliency", "shared_prefill",
    "tensor_parallel_group",
]
