"""`obcache` on the command line: generate, demo, eval, report, bench (the last three live with their modules)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from obcache.bench.cli import register as register_bench
from obcache.cli_args import EPILOG, add_model_arguments, add_policy_arguments, parse_budget, policy_from_args
from obcache.evaluation.cli import register as register_evaluation


def command_generate(args: argparse.Namespace) -> None:
    import stat

    from obcache.generation import generate
    from obcache.loading import load_model

    policy = policy_from_args(args)
    path = Path(args.context_file)
    if not path.exists():
        raise ValueError(f"context file {str(path)!r} does not exist")
    if not path.is_file():
        mode = path.stat().st_mode
        kinds = {stat.S_ISDIR: "directory", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
                 stat.S_ISFIFO: "named pipe", stat.S_ISSOCK: "socket"}
        kind = next((name for test, name in kinds.items() if test(mode)), "special file")
        raise ValueError(f"context file {str(path)!r} is a {kind}, not a regular text file")
    try:
        context = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"context file {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason})") from None
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

    register_evaluation(commands)
    register_bench(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input, a failed load or an interrupt end in one line on stderr, not a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, ModuleNotFoundError) as error:
        parser.exit(2, f"obcache {args.command}: error: {error}\n")
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        parser.exit(130, f"obcache {args.command}: interrupted" + (f"; {hint(args)}" if hint else "") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
