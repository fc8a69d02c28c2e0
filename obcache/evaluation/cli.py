"""`obcache eval` and `obcache report`: `register(commands)` adds them to the CLI's subparsers."""

from __future__ import annotations

import argparse
from pathlib import Path

from obcache.cli_args import EPILOG, add_model_arguments, add_policy_options, comma_list, given_options, parse_budget
from obcache.evaluation.families import ALL_TASKS
from obcache.evaluation.spec import OWN, PRECISIONS, EvalSpec
from obcache.evaluation.store import RESULTS_FILE
from obcache.policies import DEFAULT_BITS, POLICIES
from obcache.scores import SCORE_KINDS

TASK_HELP = "tasks:\n" + "\n".join(f"  {name:19s} {text}" for name, text in ALL_TASKS.items())
RESUME_HELP = f"""\
Results are appended to OUT/{RESULTS_FILE} as each sample ends. Rerunning a
command into the same --out resumes it: rows already there are skipped, the
rest are computed (an interrupted run loses at most the sample in progress).

A row is identified by its task, mode, model, sample (length, depth, seed,
index), policy with its options, score and budget, and by the settings that
change its numbers: --dtype (resolved, e.g. float32) and --attn for every
task, --max-new-tokens for the needle tasks, --future for fidelity and
oracle, --layers and --oracle-step for oracle, --stream-chunk for
perplexity. A rerun with other settings
therefore computes new rows next to the old ones, never mixing them:
`obcache report` shows each settings group in its own section. --device
(beyond the dtype it implies) and --no-progress are not part of the key.

Rows also record which model --model loaded (a built-in model's package and
GGUF; a folder's absolute path and a hash of its files). A run whose --model
loads another model than the rows of that name (another folder of the same
name, a checkpoint rewritten in place), or rows that predate this record,
is refused: give another --out."""


def _depth(text: str) -> float | None:
    return None if text == "random" else float(text)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=list(ALL_TASKS), metavar="task", help="one of the tasks listed below")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--policies", type=comma_list(str, POLICIES, "policy"), default=("h2o", "tova", "snapkv"),
                      help="comma list (default h2o,tova,snapkv; add streamingllm); the full cache is always run")
    grid.add_argument("--scores", type=comma_list(str, SCORE_KINDS, "score"),
                      default=("attention", "obc-value", "obc-key", "obc-joint"), help="comma list of scores")
    grid.add_argument("--budgets", type=comma_list(parse_budget, what="budget"), default=(0.05, 0.1, 0.2),
                      help="comma list, kept per KV head: fractions (0.1) or tokens (256)")
    grid.add_argument("--lengths", type=comma_list(int, what="length"), default=(2048,), help="context tokens (comma list)")
    grid.add_argument("--depths", type=comma_list(_depth, what="depth"), default=(None,),
                      help="needle depths in [0, 1] or 'random' (comma list; default random)")
    grid.add_argument("--samples", type=int, default=3, help="samples per length and depth (default 3)")
    grid.add_argument("--seed", type=int, default=0, help="sample i uses generator seed seed + i")
    mode = grid.add_mutually_exclusive_group()
    mode.add_argument("--query-aware", dest="query_aware", action="store_true",
                      help="compress with the question inside the prompt (the paper's NIAH setting)")
    mode.add_argument("--query-agnostic", dest="query_aware", action="store_false",
                      help="ask the question after compression (default)")
    add_policy_options(parser, grid=True)
    precision = parser.add_argument_group("precision (eviction and precision together: compared at equal bytes)")
    precision.add_argument("--precision", type=comma_list(str, PRECISIONS, "precision"), default=("16",),
                           help="comma list: how the scored policies' kept tokens are stored (default 16). "
                           + "; ".join(f"{name}: {text}" for name, text in PRECISIONS.items())
                           + ". With any but 16, --budgets are byte budgets: fractions of the prompt's full cache at "
                           "16 bits per element (the 16 rows keep that fraction of the tokens)")
    precision.add_argument("--token-cap", type=parse_budget, default=0.2,
                           help="mixed: the wrapped policy's budget, the most tokens kept at any width (default 0.2)")
    precision.add_argument("--mixed-bits", type=comma_list(int, ("16", "8", "4", "2"), "width"), default=DEFAULT_BITS,
                           help="mixed: the widths a kept token may take (default 16,8,4; 0, evicted, always)")
    precision.add_argument("--group-size", type=int, default=32,
                           help="8/4/2 and mixed: channels of a token sharing a scale and a zero (default 32)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("obcache-eval"), help="results folder (results.jsonl is appended)")
    run.add_argument("--max-new-tokens", type=int, help="answer tokens, >= 1 (default: the expected answer's + 8)")
    run.add_argument("--future", type=int, default=256, help="fidelity/oracle: tokens after the prompt (default 256)")
    run.add_argument("--stream-chunk", type=int, default=64,
                     help="perplexity: tokens fed per forward; the cache is evicted after each (default 64)")
    run.add_argument("--layers", type=comma_list(int, what="layer"), help="oracle: captured layers (default 4 spread)")
    run.add_argument("--oracle-step", type=float, default=0.05, help="oracle: fraction removed per greedy round")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(parser)


def spec_from_args(args: argparse.Namespace) -> EvalSpec:
    options = given_options(args)
    axes = {name: options.pop(name) for name in ("selection", "chunk") if name in options}
    return EvalSpec(
        task=args.task, policies=args.policies, scores=args.scores, budgets=args.budgets, lengths=args.lengths,
        depths=args.depths, samples=args.samples, seed=args.seed, query_aware=args.query_aware, model=args.model,
        out=args.out, options=options, selections=axes.get("selection", ("per-head",)), chunks=axes.get("chunk", (1,)),
        allocations=args.allocation or (OWN,), alpha=args.alpha, beta=args.beta,
        max_new_tokens=args.max_new_tokens, future=args.future, layers=args.layers, oracle_step=args.oracle_step,
        stream_chunk=args.stream_chunk, precisions=args.precision, token_cap=args.token_cap,
        mixed_bits=args.mixed_bits, group_size=args.group_size, dtype=args.dtype, attn=args.attn, device=args.device,
    )


def command_eval(args: argparse.Namespace) -> None:
    from obcache.evaluation.runner import run_eval

    print(run_eval(spec_from_args(args), progress=not args.no_progress))


def resume_hint(args: argparse.Namespace) -> str:
    """What an interrupted `obcache eval` tells its user."""
    return (f"the rows already in {args.out / RESULTS_FILE} are kept; run the same command again to resume "
            "(only the missing rows are computed)")


def command_report(args: argparse.Namespace) -> None:
    from obcache.evaluation.report import write_report

    print(write_report(args.dir))


def register(commands) -> None:
    """Add `eval` and `report` to an argparse subparsers object."""
    formatter = argparse.RawDescriptionHelpFormatter
    evaluate = commands.add_parser("eval", help="run a task over policies x scores x budgets (resumable)",
                                   description=RESUME_HELP, epilog=TASK_HELP + "\n\n" + EPILOG,
                                   formatter_class=formatter)
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=command_eval, interrupt_hint=resume_hint)
    report = commands.add_parser("report", help="markdown tables and PNG plots of an eval folder")
    report.add_argument("dir", type=Path, help="folder holding results.jsonl")
    report.set_defaults(run=command_report)
