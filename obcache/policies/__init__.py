"""Eviction policies, each taking any score, and the paper's presets."""

from __future__ import annotations

from obcache.policies.base import LayerState, Policy
from obcache.policies.h2o import H2O
from obcache.policies.snapkv import SnapKV
from obcache.policies.streaming import StreamingLLM
from obcache.policies.tova import TOVA

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (H2O, TOVA, SnapKV, StreamingLLM)}

POLICY_HELP: dict[str, str] = {
    "h2o": "heavy hitters: scores summed over the last `window` queries (or all, --full-history); keeps the last `window` tokens",
    "tova": "scores from the last query only; the whole budget goes to scored tokens",
    "snapkv": "scores from an observation window of the last `window` queries, max-pooled (kernel 7); keeps the window",
    "streamingllm": "no score: 4 sink tokens plus the most recent tokens",
}


def make_policy(name: str, **kwargs) -> Policy:
    """Build a policy by name ("h2o", "tova", "snapkv", "streamingllm")."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)


PRESETS = ("niah", "longbench")


def paper_preset(setting: str, policy: str, *, budget: float | int, score: str | None = None, prompt_length: int | None = None) -> Policy:
    """A policy configured as in the paper's experiments (method.md §5).

    - "niah": RULER needle tasks; 16 recent tokens, window 16 (TOVA: last query).
    - "longbench": recent window = window = 5% of the kept tokens (needs prompt_length).
    StreamingLLM uses 4 sinks in both.
    """
    if setting not in PRESETS:
        raise ValueError(f"unknown preset {setting!r}; allowed: {', '.join(PRESETS)}")
    if policy == "streamingllm":
        return make_policy(policy, budget=budget)
    kwargs: dict = {"budget": budget, "score": score or "attention"}
    if policy in ("h2o", "snapkv"):
        if setting == "niah":
            kwargs["window"] = 16
        else:
            if prompt_length is None:
                raise ValueError("the longbench preset sizes the window from the budget: pass prompt_length")
            kept = make_policy(policy, **kwargs).kept_tokens(prompt_length)
            kwargs["window"] = max(1, round(0.05 * kept))
    return make_policy(policy, **kwargs)


__all__ = ["POLICIES", "POLICY_HELP", "PRESETS", "H2O", "LayerState", "Policy", "SnapKV", "StreamingLLM", "TOVA", "make_policy", "paper_preset"]
