"""Eviction policies, each taking any score, the budget wrappers, and the paper's presets.

Adding a policy: one module with a `Policy` (or `ScoredPolicy`) subclass, and
one line in `REGISTRY` below; the command line, the evaluation grid, the demo
and the benchmark read its name, summary and options from the class.
"""

from __future__ import annotations

import dataclasses

from obcache.policies.kvzip.policy import KVzip, KVzipHeads, KVzipReplay
from obcache.layer_state import LayerState
from obcache.policies.allocation import AdaKV, GlobalKV, PyramidKV, Wrapper
from obcache.policies.base import Policy, ScoredPolicy
from obcache.policies.decoding import Decoding
from obcache.policies.h2o import H2O
from obcache.policies.mixed import DEFAULT_BITS, MixedPrecision, Quantized
from obcache.selector import Selector
from obcache.policies.snapkv import SnapKV
from obcache.policies.streaming import StreamingLLM
from obcache.policies.tova import TOVA

REGISTRY: tuple[type[Policy], ...] = (H2O, TOVA, SnapKV, StreamingLLM, KVzip, KVzipReplay, KVzipHeads)
POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in REGISTRY}

ALLOCATIONS: dict[str, str] = {
    "uniform": "every KV head of every layer keeps the budget",
    "adakv": "head-adaptive: per layer, budget x heads slots to the best scores, each head >= alpha x budget",
    "pyramid": "per-layer budgets falling with depth, mean = budget (beta sets the slope)",
    "adakv+pyramid": "AdaKV over PyramidKV: each layer's pyramid budget spread head-adaptively",
    "global": "one pool for all heads of all layers (KVzip): budget x heads x layers slots, each head >= alpha x budget",
}


def policy_options(cls: type[Policy]) -> dict[str, dataclasses.Field]:
    """The hyper-parameters of a policy class (its dataclass fields), by name."""
    return {f.name: f for f in dataclasses.fields(cls)}


def make_policy(name: str, **options) -> Policy:
    """Build a policy by name ("h2o", "tova", "snapkv", "streamingllm", "kvzip") with its options."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    if options.get("score") is not None and not cls.takes_score:
        raise ValueError(f"{name} takes no score: it keeps tokens by position")
    unknown = sorted(set(options) - set(policy_options(cls)))
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(unknown)}; its options: {', '.join(policy_options(cls))}")
    return cls(**options)


def allocate(policy: Policy, allocation: str | None = None, *, alpha: float = 0.2, beta: float = 20.0) -> Selector:
    """Wrap `policy` for an allocation name: "uniform", "adakv", "pyramid", "adakv+pyramid" or "global"; None
    leaves the policy's own (uniform; the KVzip family: global, which "uniform" or "global" then sets).

    A composed name lists the wrappers outermost first, as `policy_allocation` reports them.
    """
    if allocation is not None and allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    if allocation is None:
        return policy
    if "allocation" in policy_options(type(policy)) and allocation in ("uniform", "global"):
        return dataclasses.replace(policy, allocation=allocation, alpha=alpha)  # the KVzip family's own field
    for name in reversed(allocation.split("+")):  # innermost first
        if name == "pyramid":
            policy = PyramidKV(policy, beta=beta)
        elif name == "adakv":
            policy = AdaKV(policy, alpha=alpha)
        elif name == "global":
            policy = GlobalKV(policy, alpha=alpha)
    return policy


def build_policy(name: str, *, budget, score: str | None, options: dict, allocation: str | None = None,
                 alpha: float = 0.2, beta: float = 20.0, strict: bool = True) -> Selector:
    """A policy (wrapped for its allocation) from plain values, e.g. the command line's; validates everything.

    `options` that the policy lacks raise with `strict`, and are skipped otherwise.
    """
    fields = policy_options(POLICIES[name]) if name in POLICIES else {}
    unknown = sorted(set(options) - set(fields))
    if unknown and strict:
        raise ValueError(f"{name} has no option {', '.join('--' + u.replace('_', '-') for u in unknown)}")
    chosen = {key: value for key, value in options.items() if key in fields}
    if name in POLICIES and POLICIES[name].takes_score:
        chosen["score"] = score
    policy = make_policy(name, budget=budget, **chosen)
    return allocate(policy, allocation, alpha=alpha, beta=beta)


def policy_allocation(selector: Selector) -> str:
    """The allocation name of a (possibly wrapped) policy: "uniform", or the wrappers', outermost first."""
    return selector.allocation_label()


def policy_label(selector: Selector) -> str:
    """A short name of a policy's method: "snapkv", "snapkv[kernel=15]+shared+chunk8", "adakv(snapkv)", ...

    Options that differ from the class defaults (budget and score aside) are shown in brackets.
    """
    return selector.label()


#: The configuration the evaluation found best (RESULTS.md): SnapKV with a pooling kernel wide enough for
#: digit-per-token answers, 8-token spans, head-adaptive budgets, 4 protected attention sinks (without them
#: obc-value and obc-joint lose to attention on Qwen at 95% removed), and the OBCache score that never did
#: worse than attention on either model (obc-key).
RECOMMENDED = {"policy": "snapkv", "options": {"sinks": 4, "kernel": 15, "chunk": 8}, "allocation": "adakv",
               "score": "obc-key"}


def recommended(budget: float | int = 0.1, score: str = RECOMMENDED["score"], **options) -> Selector:
    """The recommended policy (`RECOMMENDED`) at a budget and score; `options` override its policy options."""
    policy = make_policy(RECOMMENDED["policy"], budget=budget, score=score, **{**RECOMMENDED["options"], **options})
    return allocate(policy, RECOMMENDED["allocation"])


PRESETS = ("niah", "longbench")


def paper_preset(setting: str, policy: str, *, budget: float | int, score: str | None = None, prompt_length: int | None = None) -> Policy:
    """A policy configured as in the paper's experiments (method.md §5).

    - "niah": RULER needle tasks; 16 recent tokens, window 16 (TOVA: last query).
    - "longbench": recent window = window = 5% of the kept tokens (needs prompt_length).
    StreamingLLM uses 4 sinks in both.
    """
    if setting not in PRESETS:
        raise ValueError(f"unknown preset {setting!r}; allowed: {', '.join(PRESETS)}")
    cls = POLICIES.get(policy)
    if cls is None or not cls.takes_score:
        return make_policy(policy, budget=budget)
    kwargs: dict = {"budget": budget, "score": score or "attention"}
    if "window" in policy_options(cls):
        if setting == "niah":
            kwargs["window"] = 16
        else:
            if prompt_length is None:
                raise ValueError("the longbench preset sizes the window from the budget: pass prompt_length")
            kept = make_policy(policy, **kwargs).kept_tokens(prompt_length)
            kwargs["window"] = max(1, round(0.05 * kept))
    return make_policy(policy, **kwargs)


__all__ = [
    "ALLOCATIONS", "AdaKV", "DEFAULT_BITS", "Decoding", "GlobalKV", "H2O", "KVzip", "KVzipHeads", "KVzipReplay", "LayerState",
    "MixedPrecision", "POLICIES", "PRESETS", "Policy", "PyramidKV", "Quantized", "REGISTRY", "ScoredPolicy", "Selector", "SnapKV", "StreamingLLM",
    "TOVA", "Wrapper", "allocate", "build_policy", "make_policy", "paper_preset", "policy_allocation", "policy_label",
    "policy_options", "RECOMMENDED", "recommended",
]
