"""`obcache bench` / `python benchmarks/run.py`: arguments, the plan of a run, and the run itself."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import obcache.bench
from obcache.bench.decoding import DecodePlan, measure_decoding
from obcache.bench.layouts import LayoutPlan, measure_layouts, measure_scale, needle_prompt
from obcache.bench.measure import (
    cache_entry, decode_configs, hooked_prefill, measure_decode, measure_eviction, measure_full_history,
    measure_scoring, oversubscription, plain_prefill, recorded_prefill,
)
from obcache.bench.memory import run_memory_worker
from obcache.bench.reconstruction import measure_reconstruction, reconstruction_policies
from obcache.bench.report import budget_key, check_targets, format_report
from obcache.bench.shapes import RANDOM_SHAPES, SCALE_SHAPE, load_benchmark_model, prompt
from obcache.cli_args import GRID_AXES, add_model_arguments, add_policy_arguments, given_options
from obcache.loading import load_tokenizer
from obcache.policies import (
    Decoding, H2O, POLICIES, REGISTRY, Selector, build_policy, policy_label, policy_options, recommended,
)
from obcache.policies.kvzip.policy import KVzipBase
from obcache.scores import SCORE_KINDS

DEFAULT_LENGTHS = (2048, 4096, 8192)
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.5)
WARM_LENGTH = 256
#: --decode: tokens kept per KV head when --decode-budget is not given.
DECODE_BUDGET = 512


def add_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("benchmark")
    run.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="context lengths in tokens")
    run.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS),
                     help="fractions kept by the uniform policy, for decode speed and cache bytes")
    run.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per throughput measurement")
    run.add_argument("--repeats", type=int, default=5, help="repetitions of each per-layer scoring timing")
    run.add_argument("--random-weights", choices=sorted(RANDOM_SHAPES), default=None,
                     help="random weights of this shape instead of a checkpoint (timing/memory only)")
    run.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    run.add_argument("--out", default="bench-results.json", help="JSON results file")
    run.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    run.add_argument("--no-full-history", action="store_true", help="skip the H2O full-history measurement")
    decode = parser.add_argument_group(
        "decode-time eviction (--decode)",
        f"--decode-budget (here default {DECODE_BUDGET}) and --decode-interval set obcache.Decoding; --score and the "
        "policy options (--window, ...) shape the wrapped policy, with uniform allocation.")
    decode.add_argument("--decode", action="store_true",
                        help="benchmark eviction during generation (Decoding) instead of the prefill suite")
    decode.add_argument("--decode-policy", choices=[*POLICIES, "recommended"], default=None,
                        help="policy that Decoding wraps (default: --policy); 'recommended': obcache.recommended() "
                             "at the decode budget (AdaKV over SnapKV spans, its own score; the paged layout)")
    decode.add_argument("--decode-context", type=int, default=2048, help="prompt tokens (default 2048)")
    decode.add_argument("--decode-tokens", type=int, default=2048, help="tokens generated after it (default 2048)")
    decode.add_argument("--decode-timed", type=int, default=512, help="last generated tokens timed (default 512)")
    decode.add_argument("--decode-intervals", type=int, nargs="+", default=[1, 16, 64],
                        help="eviction intervals whose per-token overhead is measured (default 1 16 64)")
    decode.add_argument("--decode-rounds", type=int, default=3, help="timed rounds, the best kept (default 3)")
    layouts = parser.add_argument_group(
        "layouts vs the limit (--layouts)",
        "decode tok/s of the full cache, a plain cache of the kept length (the limit), the uniform layout "
        "(SnapKV, obc-key) and the paged one (obcache.recommended: AdaKV) at --budget, on needle contexts of "
        "--lengths tokens at each of --batches; bytes held after eviction; the same on a random-weight model with "
        "an 8B-shaped attention (--scale-*). Add --decode to run the decode-time eviction benchmark in the same "
        "process.")
    layouts.add_argument("--layouts", action="store_true", help="benchmark the cache layouts against the limit")
    layouts.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8], help="batch sizes (default 1 4 8)")
    layouts.add_argument("--steps", type=int, default=24, help="timed decoding steps per round (default 24)")
    layouts.add_argument("--rounds", type=int, default=3, help="interleaved rounds, the median kept (default 3)")
    layouts.add_argument("--scale-shape", choices=sorted(RANDOM_SHAPES), default=SCALE_SHAPE,
                         help=f"random-weight model shape of the scale cell (default {SCALE_SHAPE})")
    layouts.add_argument("--scale-length", type=int, default=8192, help="context of the scale cell (default 8192)")
    layouts.add_argument("--scale-batch", type=int, default=8, help="batch of the scale cell (default 8)")
    layouts.add_argument("--no-scale", action="store_true", help="skip the scale cell")
    rebuild = parser.add_argument_group("context reconstruction (--reconstruction)")
    rebuild.add_argument("--reconstruction", action="store_true",
                         help="time KVzip's compressing prefill (full reconstruction and the cheaper variant, "
                              "--score, --budget) against a plain prefill, on --lengths (default here 2048)")
    add_policy_arguments(parser)
    parser.set_defaults(allocation="adakv", score="obc-joint")  # the targets' configuration: the costliest score
    add_model_arguments(parser)


DESCRIPTION = obcache.bench.__doc__ + (
    "\nThe policy flags give the mode; here --allocation defaults to adakv and --score to obc-joint (the costliest\n"
    "score, as the targets are set). The uniform policy is the same\n"
    "policy with --allocation uniform and without --selection/--chunk."
)


def register(commands) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object."""
    parser = commands.add_parser("bench", help="time, memory and cache size of eviction vs the full cache",
                                 description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        run(parser.parse_args(argv))
    except ValueError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 0


@dataclass
class Plan:
    """The policies one run measures, by key, and what each key is for.

    grid: "policy/score" keys, every policy x score at --budget (uniform allocation).
    uniform: the grid key of the policy as given, with uniform allocation.
    sweep: budget key -> budget, the uniform policy at each of --budgets and --budget.
    specs: "uniform" / "mode" -> `build_policy` keyword arguments (for the memory worker).
    policies: every policy by key: the grid, the sweep, and "mode" (the policy as given).
    window: query rows captured for the scoring measurement.
    """

    grid: list[str]
    uniform: str
    sweep: dict[str, float | int]
    specs: dict[str, dict]
    policies: dict[str, Selector]
    window: int


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Build (and so validate) every policy of a run, before any model is loaded."""
    if args.policy == "none":
        raise ValueError("bench compares eviction with the full cache: give a policy, not 'none'")
    if args.decode_budget is not None:
        raise ValueError("--decode-budget sets the decode-time eviction benchmark: add --decode")
    options = given_options(args)
    uniform_options = {name: value for name, value in options.items() if name not in GRID_AXES}
    mode = {"name": args.policy, "budget": args.budget, "score": args.score, "options": options,
            "allocation": args.allocation, "alpha": args.alpha, "beta": args.beta}
    specs = {"uniform": {**mode, "options": uniform_options, "allocation": "uniform"}, "mode": mode}
    policies: dict[str, Selector] = {}
    for cls in REGISTRY:
        if issubclass(cls, KVzipBase):  # the family's cost is measured by `bench --reconstruction`
            continue
        for score in SCORE_KINDS if cls.takes_score else [None]:
            policies[f"{cls.name}/{score or '-'}"] = build_policy(
                cls.name, budget=args.budget, score=score, options=uniform_options, strict=False)
    grid = list(policies)
    sweep = {budget_key(b): b for b in [*args.budgets, args.budget]}
    for key, budget in sweep.items():
        policies[key] = build_policy(**{**specs["uniform"], "budget": budget})
    policies["mode"] = build_policy(**mode)
    for length in args.lengths:
        for policy in policies.values():
            policy.check_prompt([length])
    uniform = f"{args.policy}/{args.score if POLICIES[args.policy].takes_score else '-'}"
    window = options.get("window", policy_options(H2O)["window"].default)
    return Plan(grid, uniform, sweep, specs, policies, window)


def decode_plan_from_args(args: argparse.Namespace) -> DecodePlan:
    """Build (and so validate) the policies of `bench --decode` before any model is loaded."""
    name = args.decode_policy or args.policy
    if name == "none":
        raise ValueError("bench --decode evicts during generation: give a policy, not 'none'")
    for flag in ("context", "tokens", "timed", "rounds"):
        if getattr(args, f"decode_{flag}") < 1:
            raise ValueError(f"--decode-{flag} must be >= 1")
    if args.decode_timed > args.decode_tokens:
        raise ValueError(f"--decode-timed {args.decode_timed} is more than the {args.decode_tokens} tokens generated")
    budget = DECODE_BUDGET if args.decode_budget is None else args.decode_budget
    options = {key: value for key, value in given_options(args).items() if key not in GRID_AXES}
    if name == "recommended":
        policy = recommended(budget=budget)
    else:
        policy = build_policy(name, budget=budget, score=args.score, options=options)
    evicting = {interval: Decoding(policy, capacity=budget, interval=interval)
                for interval in {*args.decode_intervals, args.decode_interval}}
    base = policy.base
    plan = DecodePlan(policy, evicting, f"{policy_label(policy)}/{base.score if base.takes_score else '-'}",
                      budget, args.decode_interval, args.decode_context, args.decode_tokens, args.decode_timed,
                      args.decode_rounds)
    plan.policy.check_prompt([plan.context])
    plan.policy.check_prompt([plan.full_length])
    return plan


def layout_plan_from_args(args: argparse.Namespace) -> LayoutPlan:
    """Build (and so validate) the policies and cells of `bench --layouts` before any model is loaded."""
    for flag in ("steps", "rounds", "scale_length", "scale_batch"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    if min(args.batches) < 1:
        raise ValueError("--batches must be >= 1")
    if args.decode_budget is not None and not args.decode:
        raise ValueError("--decode-budget sets the decode-time eviction benchmark: add --decode")
    plan = LayoutPlan(args.budget, list(args.lengths), list(args.batches), args.steps, args.rounds,
                      None if args.no_scale else args.scale_shape, args.scale_length, args.scale_batch)
    for policy in plan.policies.values():
        policy.check_prompt([min(plan.lengths)])
        if plan.scale_shape is not None:
            policy.check_prompt([plan.scale_length])
    return plan


def machine() -> dict:
    """Versions, CPU, threads, load average: what the numbers depend on."""
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache")
        info["lscpu"] = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines())
                         if k.strip() in keep}
    except (OSError, subprocess.CalledProcessError):
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def bench_length(model: nn.Module, length: int, args: argparse.Namespace, plan: Plan, device: torch.device) -> dict:
    """Every measurement at one context length (one entry of the report's `lengths`)."""
    ids = prompt(length, model.config.vocab_size, device)
    full, prefill_seconds = plain_prefill(model, ids, device)
    row: dict = {"length": length, "prefill_seconds": prefill_seconds}
    row["hooked"] = {role: hooked_prefill(model, ids, plan.policies[key], device)
                     for role, key in (("uniform", plan.uniform), ("mode", "mode"))}
    recorder, cache = recorded_prefill(model, ids, plan.policies, plan.window)
    row["eviction_seconds"] = measure_eviction(recorder, cache, device, [*plan.grid, "mode"])
    row["scoring_seconds"] = measure_scoring(recorder.windows, args.repeats, device)
    fractions = {key: budget if isinstance(budget, float) else budget / length for key, budget in plan.sweep.items()}
    fractions["mode"] = fractions[budget_key(args.budget)]
    row["caches"] = {"full": cache_entry(cache, None)}
    row["caches"].update({key: cache_entry(cache.subset(recorder.masks[key]), f) for key, f in fractions.items()})
    configs = decode_configs(model, full, cache, {key: recorder.masks[key] for key in fractions})
    row["decode"] = measure_decode(model, ids[:, -1:], configs, args.new_tokens, device)
    if not args.no_full_history:
        row["full_history"] = [measure_full_history(recorder.full_state, cache.kv_nbytes(), score, device)
                               for score in ("attention", "obc-joint")]
    del full, cache, recorder
    if not args.no_memory:
        base = {"length": length, "model": args.model, "random_weights": args.random_weights, "attn": args.attn,
                "dtype": args.dtype, "device": str(device), "threads": args.threads}
        row["memory"] = {role: run_memory_worker({**base, "policy": spec})
                         for role, spec in (("plain", None), ("uniform", plan.specs["uniform"]), ("mode", plan.specs["mode"]))}
    return row


def warm_up(model: nn.Module, plan: Plan, lengths: list[int], device: torch.device) -> None:
    """First-call costs out of the timings: short prefills (plain, hooked, recorded) and every policy's keep."""
    try:
        for policy in plan.policies.values():
            policy.check_prompt([WARM_LENGTH])
        length = WARM_LENGTH
    except ValueError:  # a budget or window too large for a short prompt
        length = min(lengths)
    ids = prompt(length, model.config.vocab_size, device)
    plain_prefill(model, ids, device)
    for key in (plan.uniform, "mode"):
        hooked_prefill(model, ids, plan.policies[key], device)
    recorder, cache = recorded_prefill(model, ids, plan.policies, plan.window)
    measure_eviction(recorder, cache, device, list(plan.policies))


def run_layouts(model: nn.Module, args: argparse.Namespace, plan: LayoutPlan, device: torch.device) -> dict:
    """`bench --layouts` on the default model: needle prompts (pseudo-random ids with --random-weights)."""
    if args.random_weights is None:
        tokenizer = load_tokenizer(args.model)
        prompts = lambda length: needle_prompt(tokenizer, length)  # noqa: E731
    else:
        prompts = lambda length: prompt(length, model.config.vocab_size, device)[0].tolist()  # noqa: E731
    progress = lambda what: print(f"obcache bench --layouts: {what} ...", file=sys.stderr, flush=True)  # noqa: E731
    return measure_layouts(model, prompts, plan, device, progress)


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark (or, with --decode, the decode-time eviction one; with --layouts, the layouts against the
    limit, and decode-time eviction too if --decode is given): measure, check the targets, write the JSON, print the
    report."""
    if args.random_weights is not None and args.model is not None:
        raise ValueError("give --model or --random-weights, not both")
    if args.reconstruction and args.layouts:
        raise ValueError("--reconstruction and --layouts are separate benchmarks: give one")
    if args.layouts:
        plan = layout_plan_from_args(args)
        decode_plan = decode_plan_from_args(args) if args.decode else None
    elif args.reconstruction:
        if args.decode:
            raise ValueError("--reconstruction and --decode are separate benchmarks: give one")
        if args.random_weights is not None:
            raise ValueError("--reconstruction needs a real model: its reconstruction prompt is text")
        plan = reconstruction_policies(args.score, args.budget)
        if args.lengths == list(DEFAULT_LENGTHS):
            args.lengths = [2048]
    else:
        plan = decode_plan_from_args(args) if args.decode else plan_from_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = load_benchmark_model(args.model, args.random_weights, args.attn, args.dtype, device)
    report = {"machine": machine() | {"oversubscription": [oversubscription(device)]},
              "device": str(device), "dtype": str(model.dtype), "attn": args.attn,
              "model": f"random weights, {args.random_weights} shape" if args.random_weights
              else args.model or "smollm2-135m-instruct",
              "command": " ".join(sys.argv), "kv_heads": model.config.num_key_value_heads,
              "query_heads": model.config.num_attention_heads}
    if args.layouts:
        report["layouts"] = run_layouts(model, args, plan, device)
        if decode_plan is not None:
            print(f"obcache bench --decode: {decode_plan.context} + {decode_plan.new_tokens} tokens ...",
                  file=sys.stderr, flush=True)
            report["decoding"] = measure_decoding(model, decode_plan, device)
        if plan.scale_shape is not None:
            del model
            print(f"obcache bench --layouts: scale, {plan.scale_shape} random weights, {plan.scale_length} tokens, "
                  f"batch {plan.scale_batch} ...", file=sys.stderr, flush=True)
            scale = load_benchmark_model(None, plan.scale_shape, args.attn, args.dtype, device)
            report["layouts"]["scale"] = measure_scale(scale, plan, device)
    elif args.reconstruction:
        print(f"obcache bench --reconstruction: {args.lengths} tokens ...", file=sys.stderr, flush=True)
        report["reconstruction"] = measure_reconstruction(model, load_tokenizer(args.model), args.lengths, plan,
                                                          args.decode_rounds, device)
    elif args.decode:
        print(f"obcache bench --decode: {plan.context} + {plan.new_tokens} tokens ...", file=sys.stderr, flush=True)
        report["decoding"] = measure_decoding(model, plan, device)
    else:
        report.update({"new_tokens": args.new_tokens, "window": plan.window, "budget": args.budget,
                       "uniform": plan.uniform, "mode": policy_label(plan.policies["mode"]), "specs": plan.specs,
                       "lengths": []})
        warm_up(model, plan, args.lengths, device)
        for length in args.lengths:
            print(f"obcache bench: {length} tokens ...", file=sys.stderr, flush=True)
            report["lengths"].append(bench_length(model, length, args, plan, device))
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["machine"]["oversubscription"].append(oversubscription(device))
    report["targets"] = check_targets(report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_report(report))
    print(f"results written to {args.out}", file=sys.stderr)
    return report
