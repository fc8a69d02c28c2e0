"""`obcache` on the command line: generate, demo, eval, report, bench (the last three live with their modules)."""

from __future__ import annotations

import argparse
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError

from obcache.bench.cli import register as register_bench
from obcache.cli_args import EPILOG, add_model_arguments, add_policy_arguments, policy_from_args
from obcache.evaluation.cli import register as register_evaluation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def context_path(text: str) -> Path:
    """The --context-file path, checked to be an existing regular file."""
    path = Path(text)
    if not path.exists():
        raise ValueError(f"context file {str(path)!r} does not exist")
    if not path.is_file():
        mode = path.stat().st_mode
        kinds = {stat.S_ISDIR: "directory", stat.S_ISCHR: "character device", stat.S_ISBLK: "block device",
                 stat.S_ISFIFO: "named pipe", stat.S_ISSOCK: "socket"}
        kind = next((name for test, name in kinds.items() if test(mode)), "special file")
        raise ValueError(f"context file {str(path)!r} is a {kind}, not a regular text file")
    return path


def read_context(path: Path, tokenizer: PreTrainedTokenizerBase, limit: int | None) -> str:
    """The text of a context file, refused before it is tokenized if it is empty or cannot fit in `limit` tokens.

    No token spans more characters than the tokenizer's longest vocabulary
    entry, so a text longer than `limit` times that cannot fit; a file of more
    than 4 bytes (UTF-8's most per character) per such character is refused
    from its size, unread.
    """
    longest = max(map(len, tokenizer.get_vocab()))
    most = None if limit is None else limit * longest

    def too_long(amount: str) -> ValueError:
        return ValueError(f"context file {str(path)!r} has {amount}: the model's limit of {limit} positions "
                          f"(max_position_embeddings) holds at most {most:,} characters with this tokenizer (its "
                          f"longest token has {longest})")

    size = path.stat().st_size
    if most is not None and size > 4 * most:
        raise too_long(f"{size:,} bytes, so at least {-(-size // 4):,} characters")
    try:
        context = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"context file {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason})") from None
    if not context.strip():
        raise ValueError(f"context file {str(path)!r} is {'whitespace only' if context else 'empty'}: give a text "
                         "file with the context to compress")
    if most is not None and len(context) > most:
        raise too_long(f"{len(context):,} characters")
    return context


def command_generate(args: argparse.Namespace) -> None:
    """Check everything the config and tokenizer can tell (context file, prompt length) before the weights load."""
    from obcache.generation import build_prompt, check_positions, generate
    from obcache.loading import load_config, load_model, load_tokenizer
    from obcache.models import position_limit

    policy = policy_from_args(args)
    path = context_path(args.context_file)
    config = load_config(args.model)
    tokenizer = load_tokenizer(args.model)
    context = read_context(path, tokenizer, position_limit(config))
    prompt = {"chat_template": not args.no_chat_template, "answer_prefix": args.answer_prefix}
    tokens = sum(map(len, build_prompt(tokenizer, context, args.question, **prompt)))
    check_positions(config, tokens, args.max_new_tokens)  # generate's own check, before the weights load
    model, tokenizer = load_model(args.model, attn_implementation=args.attn, dtype=args.dtype, device=args.device)
    result = generate(model, tokenizer, context, args.question, policy=policy, query_aware=args.query_aware,
                      max_new_tokens=args.max_new_tokens, **prompt)
    print(result.text)
    print(result.summary(), file=sys.stderr)


def command_demo(args: argparse.Namespace) -> None:
    from obcache.demo import chosen_policies, run_demo
    from obcache.policies import RECOMMENDED, Decoding

    if args.policy == "none":
        raise ValueError("demo compares a policy with the full cache: give a policy, not 'none'")

    def make(score: str):
        return policy_from_args(argparse.Namespace(**{**vars(args), "score": score, "decode_budget": None}))

    chosen = chosen_policies(make)  # every score, validated before the model loads
    decode = None
    if args.decode_budget:
        decode = Decoding(make(RECOMMENDED["score"]), capacity=args.decode_budget, interval=args.decode_interval)
    run_demo(
        chosen, model_name=args.model, length=args.length, budget=args.budget, query_aware=not args.query_agnostic,
        decode_policy=decode, long_tokens=args.long_tokens, device=args.device, dtype=args.dtype,
        attn_implementation=args.attn,
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
    add_policy_arguments(generate, default_policy="recommended")
    add_model_arguments(generate)
    generate.set_defaults(run=command_generate)

    demo = commands.add_parser(
        "demo", help="the main job: a needle question under several policies, then a long bounded generation",
        description="A needle question under the full cache, StreamingLLM, the paper's SnapKV and the chosen "
        "policy (--policy and its options; default: the recommended one) with every score; then a long answer "
        "with eviction during decoding (--decode-budget; 0 skips it). --score is not used: every score is shown.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--length", type=int, default=2048, help="context tokens (default 2048)")
    demo.add_argument("--query-agnostic", action="store_true", help="ask the question after compression")
    demo.add_argument("--long-tokens", type=int, default=384, help="tokens of the long answer (default 384)")
    add_policy_arguments(demo, default_policy="recommended")
    add_model_arguments(demo)
    demo.set_defaults(run=command_demo, budget=0.2, decode_budget=256)

    register_evaluation(commands)
    register_bench(commands)
    return parser


def failure(error: BaseException) -> str:
    """An error as one line: bad input and failed loads as they say; out of memory and runtime errors named."""
    text = " ".join(str(error).split())
    if isinstance(error, (ValueError, OSError, ModuleNotFoundError)):
        return text
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return f"out of memory ({type(error).__name__})" + (f": {text}" if text else "")
    return f"{type(error).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input, a failed load, running out of memory, a runtime error or an interrupt end
    in one line on stderr, not a traceback (exit status 2 for bad input and failed loads, 1 otherwise)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, ModuleNotFoundError) as error:
        parser.exit(2, f"obcache {args.command}: error: {failure(error)}\n")
    except (MemoryError, RuntimeError, SafetensorError) as error:
        parser.exit(1, f"obcache {args.command}: error: {failure(error)}\n")
    except KeyboardInterrupt:
        hint = getattr(args, "interrupt_hint", None)
        parser.exit(130, f"obcache {args.command}: interrupted" + (f"; {hint(args)}" if hint else "") + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
