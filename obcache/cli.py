"""`obcache` on the command line: generate, demo, eval, report, bench (the last three live with their modules)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from obcache.policies import POLICIES, POLICY_HELP, Policy, make_policy
from obcache.scores import SCORE_KINDS

EPILOG = "policies:\n" + "\n".join(f"  {name:13s} {text}" for name, text in POLICY_HELP.items())
EPILOG += "\n\nscores (higher = keep):\n" + "\n".join(f"  {name:13s} {text}" for name, text in SCORE_KINDS.items())
EPILOG += (
    "\n\nbudget: what is KEPT per layer and KV head, protected tokens included:"
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


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("eviction policy")
    group.add_argument("--policy", default="snapkv", choices=[*POLICIES, "none"], help="eviction policy ('none' = full cache)")
    group.add_argument("--score", default="obc-joint", choices=list(SCORE_KINDS), help="token score used by the policy")
    group.add_argument("--budget", type=parse_budget, default=0.1, help="kept per KV head: fraction (0.1) or tokens (256)")
    group.add_argument("--window", type=int, help="query window / protected recent tokens (h2o, snapkv; default 16)")
    group.add_argument("--sinks", type=int, help="first tokens always kept (default 0; streamingllm 4)")
    group.add_argument("--full-history", action="store_true", help="h2o: sum scores over every prompt query")
    group.add_argument("--pooling", choices=["max", "avg", "none"], help="snapkv pooling (default max)")
    group.add_argument("--kernel", type=int, help="snapkv pooling kernel (default 7)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="built-in alias or local path (default: SmolLM2-135M-Instruct)")
    group.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    group.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bf16 on CUDA)")
    group.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")


def policy_from_args(args: argparse.Namespace) -> Policy | None:
    """Build (and so validate) the policy before any model is loaded."""
    if args.policy == "none":
        return None
    options = {"budget": args.budget}
    if args.policy != "streamingllm":
        options["score"] = args.score
    for name in ("window", "sinks", "pooling", "kernel"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.full_history:
        options["full_history"] = True
    allowed = set(POLICIES[args.policy].__dataclass_fields__)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{args.policy} has no option {', '.join('--' + u.replace('_', '-') for u in unknown)}")
    return make_policy(args.policy, **options)


def command_generate(args: argparse.Namespace) -> None:
    from obcache.generation import generate
    from obcache.loading import load_model

    policy = policy_from_args(args)
    path = Path(args.context_file)
    if not path.is_file():
        raise ValueError(f"context file {str(path)!r} does not exist")
    context = path.read_text(encoding="utf-8")
    model, tokenizer = load_model(args.model, attn_implementation=args.attn, dtype=args.dtype, device=args.device)
    result = generate(
        model, tokenizer, context, args.question, policy=policy, query_aware=args.query_aware,
        max_new_tokens=args.max_new_tokens, chat_template=not args.no_chat_template, answer_prefix=args.answer_prefix,
    )
    print(result.text)
    print(result.summary(), file=sys.stderr)


def command_demo(args: argparse.Namespace) -> None:
    from obcache.demo import run_demo

    run_demo(
        args.model, length=args.length, budget=args.budget, query_aware=not args.query_agnostic,
        device=args.device, dtype=args.dtype,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="obcache",
        description="KV-cache eviction with OBCache output-aware scores.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate", help="answer a question about a long context file", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("--context-file", required=True, help="text file with the long context")
    generate.add_argument("--question", default=None, help="question asked after the context")
    generate.add_argument("--query-aware", action="store_true", help="compress with the question inside the prompt")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--answer-prefix", default="", help="text that starts the answer")
    generate.add_argument("--no-chat-template", action="store_true", help="plain text prompt")
    add_policy_arguments(generate)
    add_model_arguments(generate)
    generate.set_defaults(run=command_generate)

    demo = commands.add_parser("demo", help="the main job: one needle question, full cache vs policies x scores")
    demo.add_argument("--length", type=int, default=2048, help="context tokens (default 2048)")
    demo.add_argument("--budget", type=parse_budget, default=0.2, help="kept per KV head (default 0.2)")
    demo.add_argument("--query-agnostic", action="store_true", help="ask the question after compression")
    add_model_arguments(demo)
    demo.set_defaults(run=command_demo)

    from obcache.benchmark import register as register_bench  # here: they build on this module's helpers
    from obcache.evaluation.cli import register as register_evaluation

    register_evaluation(commands)
    register_bench(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"obcache {args.command}: error: {error}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
