"""Command-line arguments shared by `obcache generate | demo | eval | bench`: declared once, here.

A leaf module: it reads the policies' names, summaries and options from the
classes (`obcache.policies`), so a new policy or option needs no edit here.
"""

from __future__ import annotations

import argparse
from typing import Callable

from obcache.policies import (
    ALLOCATIONS, DEFAULT_BITS, POLICIES, RECOMMENDED, REGISTRY, Decoding, MixedPrecision, Quantized, build_policy,
    policy_options,
)
from obcache.scores import GQA_REDUCTIONS, SCORE_KINDS

#: Policy fields with their own flags (--budget, --score) or none at all.
NOT_OPTIONS = {"budget", "score", "ratings", "group", "allocation", "alpha"}
#: Options that an evaluation grid may sweep (comma lists there).
GRID_AXES = ("selection", "chunk")

EPILOG = (
    "policies:\n" + "\n".join(f"  {cls.name:13s} {cls.summary}" for cls in REGISTRY)
    + "\n\nscores (higher = keep):\n" + "\n".join(f"  {name:13s} {text}" for name, text in SCORE_KINDS.items())
    + "\n\nGQA reductions (--gqa):\n" + "\n".join(f"  {name:13s} {text}" for name, text in GQA_REDUCTIONS.items())
    + "\n\nallocations (--allocation):\n" + "\n".join(f"  {name:13s} {text}" for name, text in ALLOCATIONS.items())
    + "\n\nbudget: what is KEPT per layer and KV head, protected tokens included:"
    "\n  a number with a decimal point is a fraction of the prompt (0.1 = keep 10%),"
    "\n  an integer is a number of tokens (256 = keep 256 tokens)."
)


def parse_budget(text: str) -> float | int:
    """'0.1' -> 0.1 (fraction kept), '256' -> 256 (tokens kept)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget {text!r} is not a number: use a fraction kept like 0.1 or a token count like 256"
        ) from None


def comma_list(item: Callable, allowed=None, what: str = "value") -> Callable[[str], tuple]:
    """An argparse type: 'a,b,c' -> (item(a), item(b), item(c)), each checked against `allowed`."""

    def parse(text: str) -> tuple:
        values = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            if allowed is not None and part not in allowed:
                raise argparse.ArgumentTypeError(f"unknown {what} {part!r}; allowed: {', '.join(allowed)}")
            try:
                values.append(item(part))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{what} {part!r} is not valid") from None
        if not values:
            raise argparse.ArgumentTypeError(f"give at least one {what}")
        return tuple(values)

    return parse


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="built-in alias or local folder (default: SmolLM2-135M-Instruct)")
    group.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation (default sdpa)")
    group.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bf16 on CUDA)")
    group.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")


def _all_options() -> dict:
    """Every policy option (dataclass field) of the registered policies, first declaration wins."""
    options: dict = {}
    for cls in REGISTRY:
        for name, field in policy_options(cls).items():
            if name not in NOT_OPTIONS:
                options.setdefault(name, field)
    return options


def add_policy_options(parser: argparse.ArgumentParser, *, grid: bool = False) -> None:
    """--<option> for every policy option, plus --allocation/--alpha/--beta; with `grid`, comma lists for the axes."""
    group = parser.add_argument_group("policy options (applied where a policy has them)")
    for name, field in _all_options().items():
        flag = "--" + name.replace("_", "-")
        text = field.metadata.get("help", "")
        choices = field.metadata.get("choices")
        if isinstance(field.default, bool):
            group.add_argument(flag, action="store_true", default=None, help=text)
        elif grid and name in GRID_AXES:
            kind = str if choices else type(field.default)
            group.add_argument(flag, type=comma_list(kind, choices, name), default=None,
                               help=f"{text} (comma list; default {field.default})")
        else:
            group.add_argument(flag, type=type(field.default), choices=choices, default=None,
                               help=f"{text} (default {field.default})")
    allocation = comma_list(str, ALLOCATIONS, "allocation") if grid else str
    group.add_argument("--allocation", type=allocation, default=None, choices=None if grid else list(ALLOCATIONS),
                       help="how the budget spreads over heads and layers (comma list in a grid; default the "
                       "policy's own: uniform, for KVzip global)")
    group.add_argument("--alpha", type=float, default=0.2, help="adakv: share of the budget every head keeps (default 0.2)")
    group.add_argument("--beta", type=float, default=20.0, help="pyramid: first/last layer budget parameter (default 20)")


def add_policy_arguments(parser: argparse.ArgumentParser, *, default_policy: str = "snapkv") -> None:
    """--policy, --score, --budget and every policy option (single values).

    With default_policy="recommended", --policy also takes the `RECOMMENDED` preset (resolved by `policy_from_args`).
    """
    group = parser.add_argument_group("eviction policy")
    recommended = ", ".join(f"{k}={v}" for k, v in RECOMMENDED["options"].items())
    presets = ["recommended"] if default_policy == "recommended" else []
    group.add_argument("--policy", default=default_policy, choices=[*presets, *POLICIES, "none"],
                       help=f"eviction policy; 'none' = full cache; default {default_policy}"
                       + (f" = {RECOMMENDED['policy']} with {recommended} and {RECOMMENDED['allocation']} allocation "
                          "(the best in RESULTS.md)" if presets else ""))
    group.add_argument("--score", default=RECOMMENDED["score"], choices=list(SCORE_KINDS),
                       help="token score (default %(default)s)")
    group.add_argument("--budget", type=parse_budget, default=0.1, help="kept per KV head: fraction (0.1) or tokens (256)")
    group.add_argument("--decode-budget", type=int, default=None,
                       help="also evict during generation: tokens kept per KV head (obcache.Decoding; default: off)")
    group.add_argument("--decode-interval", type=int, default=16,
                       help="with --decode-budget: evict every this many new tokens (default 16)")
    group.add_argument("--bits", type=comma_list(int, what="width"), default=None,
                       help="store what the policy keeps at these bits (obcache.Quantized: one of 16, 8, 4, 2; with "
                       "--byte-budget, the widths a token may take, default 16,8,4)")
    group.add_argument("--byte-budget", type=float, default=None,
                       help="widths per token under this fraction of the full 16-bit cache's bytes "
                       "(obcache.MixedPrecision; the budget then caps the tokens kept at any width)")
    group.add_argument("--group-size", type=int, default=32,
                       help="with --bits/--byte-budget: channels of a token sharing a scale and zero (default 32)")
    add_policy_options(parser)


def given_options(args: argparse.Namespace) -> dict:
    """The policy options given on the command line (not left at their defaults)."""
    return {name: getattr(args, name) for name in _all_options() if getattr(args, name, None) is not None}


def policy_from_args(args: argparse.Namespace):
    """Build (and so validate) the policy of `generate`/`demo` before any model is loaded; None = full cache."""
    if args.policy == "none":
        if args.decode_budget is not None:
            raise ValueError("--decode-budget needs a policy to score tokens (not --policy none)")
        return None
    name, options, allocation = args.policy, given_options(args), args.allocation
    if name == "recommended":  # the preset, with any option or allocation given on the command line on top
        name, options = RECOMMENDED["policy"], {**RECOMMENDED["options"], **options}
        allocation = allocation or RECOMMENDED["allocation"]
    policy = build_policy(name, budget=args.budget, score=args.score, options=options,
                          allocation=allocation, alpha=args.alpha, beta=args.beta)
    if args.byte_budget is not None:
        policy = MixedPrecision(policy, byte_budget=args.byte_budget, bits=args.bits or DEFAULT_BITS,
                                group_size=args.group_size)
    elif args.bits is not None:
        if len(args.bits) != 1:
            raise ValueError(f"--bits takes one width without --byte-budget (obcache.Quantized), got {args.bits}")
        policy = Quantized(policy, bits=args.bits[0], group_size=args.group_size)
    if args.decode_budget is not None:
        policy = Decoding(policy, capacity=args.decode_budget, interval=args.decode_interval)
    return policy
