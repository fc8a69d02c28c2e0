"""What an evaluation run is (`EvalSpec`), its grid of policies, and every check that needs no model.

`check_spec` creates nothing: the output folder is made when the run starts,
after the model has loaded, so a failed load leaves no empty folder behind.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from obcache.evaluation.families import family_of
from obcache.policies import DEFAULT_BITS, POLICIES, MixedPrecision, Quantized, Selector, build_policy, policy_label, policy_options
from obcache.policies.base import check_budget
from obcache.scores import check_score_kind

FULL = "full"  # policy name of the full-cache row
OWN = "own"  # allocation axis value: each policy's default allocation
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
#: How the scored policies' kept tokens are stored (`--precision`): with any but "16", budgets are byte budgets.
PRECISIONS = {
    "16": "eviction alone: the policy keeps the budget's fraction of the tokens (bytes counted at 16 bits)",
    "8": "Quantized(policy, bits=8, byte_budget=budget): as many tokens as the budget's bytes hold at 8 bits",
    "4": "Quantized(policy, bits=4, byte_budget=budget): the same at 4 bits",
    "2": "Quantized(policy, bits=2, byte_budget=budget): the same at 2 bits",
    "mixed": "MixedPrecision(policy at --token-cap, byte_budget=budget): each token one of --mixed-bits or evicted",
}


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation run. budgets: fraction kept in (0, 1] or tokens kept (see obcache.policies)."""

    task: str
    policies: tuple[str, ...] = ("h2o", "tova", "snapkv")
    scores: tuple[str, ...] = ("attention", "obc-value", "obc-key", "obc-joint")
    budgets: tuple[float | int, ...] = (0.05, 0.1, 0.2)
    lengths: tuple[int, ...] = (2048,)
    depths: tuple[float | None, ...] = (None,)
    samples: int = 1
    seed: int = 0
    query_aware: bool = False
    model: str | None = None
    out: Path = Path("results")
    options: dict = field(default_factory=dict)  # policy fields (window, kernel, ...), where a policy has them
    selections: tuple[str, ...] = ("per-head",)  # grid axes of the scored policies
    chunks: tuple[int, ...] = (1,)
    allocations: tuple[str, ...] = (OWN,)  # OWN: each policy's own (uniform; the KVzip family: global)
    precisions: tuple[str, ...] = ("16",)  # PRECISIONS, a grid axis of the scored policies
    token_cap: float | int = 0.2  # mixed: the wrapped policy's budget, the most tokens kept at any width
    mixed_bits: tuple[int, ...] = DEFAULT_BITS  # mixed: the widths a kept token may take
    group_size: int = 32  # quantized and mixed: channels of a token sharing a scale and a zero
    alpha: float = 0.2  # adakv
    beta: float = 20.0  # pyramid
    max_new_tokens: int | None = None  # default: the expected answer's tokens + 8
    future: int = 256  # fidelity / oracle: tokens scored after the prompt
    layers: tuple[int, ...] | None = None  # oracle: captured layers (default: 4 spread over the model)
    oracle_step: float = 0.05  # oracle: fraction of the kept set removed per greedy round
    stream_chunk: int = 64  # perplexity: tokens fed per forward (the cache is evicted after each)
    dtype: str | None = None  # model dtype (default: float32 on CPU, bfloat16 on CUDA)
    attn: str = "sdpa"  # attention implementation: sdpa | eager
    device: str | None = None  # cpu | cuda (default: cuda if available)

    @property
    def mode(self) -> str:
        return family_of(self.task).mode(self)


def run_settings(spec: EvalSpec) -> dict:
    """The settings that change a row's numbers: resolved dtype, attention, and the task family's own."""
    from obcache.loading import resolve_device, resolve_dtype

    dtype = resolve_dtype(spec.dtype, resolve_device(spec.device))
    return {"dtype": str(dtype).removeprefix("torch."), "attn": spec.attn, **family_of(spec.task).settings(spec)}


def build_grid(spec: EvalSpec) -> dict[tuple[str, str | None, float | int | None], Selector | None]:
    """(policy label, score, budget) -> policy, the full cache first (raises ValueError on bad input).

    Scored policies run in every allocation x selection x chunk x precision of the spec
    (AdaKV with shared selection excepted: it has no meaning); StreamingLLM once.
    """
    for name in spec.policies:
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; allowed: {', '.join(POLICIES)}")
    for score in spec.scores:
        check_score_kind(score)
    unused = set(spec.options) - {f for name in spec.policies for f in policy_options(POLICIES[name])}
    if unused:
        raise ValueError(f"no chosen policy has the option(s) {', '.join(sorted(unused))}")
    _check_precisions(spec)
    grid: dict[tuple[str, str | None, float | int | None], Selector | None] = {(FULL, None, None): None}
    for name in spec.policies:
        scored = POLICIES[name].takes_score
        modes = (itertools.product(spec.allocations, spec.selections, spec.chunks, spec.precisions) if scored
                 else [("uniform", "per-head", 1, "16")])
        for allocation, selection, chunk, precision in modes:
            if "adakv" in allocation.split("+") and selection == "shared":
                continue
            for score in spec.scores if scored else (None,):
                for budget in spec.budgets:
                    options = {**spec.options, "selection": selection, "chunk": chunk}
                    inner = {"16": budget, "mixed": spec.token_cap}.get(precision, 1.0)  # 8/4/2: the bytes decide
                    policy = build_policy(name, budget=inner, score=score, options=options,
                                          allocation=None if allocation == OWN else allocation,
                                          alpha=spec.alpha, beta=spec.beta, strict=False)
                    if precision == "mixed":
                        policy = MixedPrecision(policy, byte_budget=budget, bits=spec.mixed_bits,
                                                group_size=spec.group_size)
                    elif precision != "16":
                        policy = Quantized(policy, bits=int(precision), byte_budget=budget, group_size=spec.group_size)
                    grid[(policy_label(policy), score, budget)] = policy
    return grid


def _check_precisions(spec: EvalSpec) -> None:
    unknown = [p for p in spec.precisions if p not in PRECISIONS]
    if unknown or not spec.precisions:
        raise ValueError(f"unknown precision(s) {unknown}; allowed: {', '.join(PRECISIONS)}")
    if set(spec.precisions) == {"16"}:
        return
    wrong = [b for b in spec.budgets if isinstance(b, bool) or not isinstance(b, float) or not 0 < b <= 1]
    if wrong:
        raise ValueError(f"with --precision {','.join(spec.precisions)} the budgets are fractions of the prompt's full "
                         f"cache at 16 bits per element, floats in (0, 1]; got {wrong}")
    if "mixed" in spec.precisions:
        try:
            check_budget(spec.token_cap)
        except (TypeError, ValueError) as error:
            raise ValueError(f"token cap: {error}") from None
    if isinstance(spec.group_size, bool) or not isinstance(spec.group_size, int) or spec.group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {spec.group_size!r}")


def _check_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_spec(spec: EvalSpec) -> dict:
    """Validate everything that needs no model and return the grid; creates nothing (ValueError on bad input)."""
    family_of(spec.task).check(spec)
    if not spec.budgets or not spec.lengths:
        raise ValueError("give at least one budget and one length")
    grid = build_grid(spec)
    _check_int("samples", spec.samples)
    for length in spec.lengths:
        _check_int("lengths", length)
        for policy in grid.values():
            if policy is not None:
                policy.check_prompt([length])
    for depth in spec.depths:
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"depths must lie in [0, 1], got {depth!r}")
    if spec.max_new_tokens is not None:
        _check_int("max_new_tokens", spec.max_new_tokens)
    _check_int("future", spec.future, minimum=2)
    _check_int("stream_chunk", spec.stream_chunk)
    for layer in spec.layers or ():
        _check_int("layers", layer, minimum=0)
    if not 0.0 < spec.oracle_step <= 1.0:
        raise ValueError(f"oracle_step must lie in (0, 1], got {spec.oracle_step}")
    if spec.attn not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attn must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {spec.attn!r}")
    run_settings(spec)  # dtype and device
    check_output_folder(spec.out)
    return grid


def check_output_folder(out: Path) -> None:
    """Raise ValueError unless `out` is, or could be created as, a writable folder (nothing is created)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{str(existing)!r} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{str(existing)!r} is not writable"
    if problem:
        raise ValueError(f"output folder {str(out)!r} is not writable: {problem}")
