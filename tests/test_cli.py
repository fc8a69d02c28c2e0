"""The command line: help, budgets, errors before any model work, generate end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import obcache
import torch
from safetensors import SafetensorError

import obcache.fanout
import obcache.loading
from obcache import cli
from obcache.cli_args import parse_budget
from obcache.loading import load_tokenizer
from tests.conftest import tiny_model


def run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_policies_scores_and_budget_meaning(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name in ("h2o", "tova", "snapkv", "streamingllm", "kvzip", "global", "attention", "obc-value", "obc-key", "obc-joint", "exact-removal"):
        assert name in out
    assert "KEPT" in out


@pytest.mark.parametrize("text,value", [("0.1", 0.1), ("1.0", 1.0), ("256", 256), ("1", 1), ("5e-2", 0.05)])
def test_parse_budget(text, value):
    parsed = parse_budget(text)
    assert parsed == value and type(parsed) is type(value)



@pytest.mark.parametrize(
    "extra,message",
    [
        (["--budget", "1.5"], "out of range"),
        (["--budget", "0"], "out of range"),
        (["--budget", "ten"], "not a number"),
        (["--policy", "lru"], "invalid choice"),
        (["--score", "obc"], "invalid choice"),
        (["--policy", "tova", "--window", "8"], "tova has no option --window"),
        (["--context-file", "/nonexistent/context.txt"], "does not exist"),
        (["--context-file", "/"], "context file '/' is a directory, not a regular text file"),
        (["--context-file", "/dev/null"], "context file '/dev/null' is a character device, not a regular text file"),
        (["--policy", "kvzip", "--reconstruct-chunk", "0"], "reconstruct_chunk must be an int >= 1"),
        (["--policy", "kvzip", "--aggregate", "mean"], "invalid choice"),
        (["--policy", "kvzip", "--allocation", "global", "--alpha", "2"], "alpha must be a number in [0, 1]"),
        (["--policy", "kvzip", "--decode-budget", "64"], "cannot score during decoding"),
        (["--bits", "3"], "widths must be in {0, 2, 4, 8, 16}"),
        (["--bits", "4,2"], "--bits takes one width without --byte-budget"),
        (["--byte-budget", "2.0"], "byte_budget is the fraction"),
        (["--byte-budget", "0.05", "--bits", "16,6"], "widths must be in {0, 2, 4, 8, 16}"),
    ],
)
def test_bad_input_fails_before_loading_the_model(extra, message, tmp_path, capsys, no_model_loading):
    context = tmp_path / "context.txt"
    context.write_text("some context")
    argv = ["generate", "--context-file", str(context), "--question", "Q?", *extra]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert message in err


def test_generate_prints_answer_and_one_line_summary(tmp_path, capsys, monkeypatch):
    tokenizer = load_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer))
    monkeypatch.setattr(obcache.loading, "load_model", lambda *a, **k: (model, tokenizer))
    context = tmp_path / "context.txt"
    context.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    code, out, err = run(
        ["generate", "--context-file", str(context), "--question", "What jumps?", "--policy", "snapkv",
         "--score", "obc-joint", "--budget", "0.25", "--window", "8", "--max-new-tokens", "5"],
        capsys,
    )
    assert code == 0
    assert out.strip()  # the answer (random weights: any text)
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("SnapKV(budget=0.25,") and "score='obc-joint'" in summary and "tokens per head" in summary


def test_a_context_file_that_is_not_utf8_is_named(tmp_path, capsys, no_model_loading):
    context = tmp_path / "latin1.txt"
    context.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    code, _, err = run(["generate", "--context-file", str(context), "--question", "Q?"], capsys)
    assert code == 2
    assert err == f"obcache generate: error: context file {str(context)!r} is not UTF-8 text (byte 3: invalid continuation byte)\n"


@pytest.fixture(scope="module")
def config_only_folder(tmp_path_factory) -> Path:
    """A supported (Llama) config and a tokenizer with no weights next to them."""
    folder = tmp_path_factory.mktemp("config-only")
    tiny_model().config.save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def truncated_folder(tmp_path_factory) -> Path:
    """A tiny model and a tokenizer whose weights file lost its second half."""
    folder = tmp_path_factory.mktemp("truncated")
    tiny_model().save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(weights.stat().st_size // 2)
    return folder


FAILED_LOADS = {"CONFIG_ONLY": "no file named model.safetensors", "/no/such/folder": "must be a local folder",
                "TRUNCATED": "model.safetensors ("}


@pytest.mark.parametrize("command", [
    ["generate", "--context-file", "CONTEXT", "--question", "Q?"],
    ["eval", "fidelity", "--lengths", "300", "--window", "8", "--out", "OUT"],
    ["demo"],
])
@pytest.mark.parametrize("model", list(FAILED_LOADS))
def test_a_failed_model_load_is_one_line_and_leaves_no_output_folder(command, model, config_only_folder,
                                                                     truncated_folder, tmp_path, capsys):
    context = tmp_path / "context.txt"
    context.write_text("some context")
    names = {"CONTEXT": str(context), "OUT": str(tmp_path / "out"), "CONFIG_ONLY": str(config_only_folder),
             "TRUNCATED": str(truncated_folder)}
    argv = [names.get(arg, arg) for arg in [*command, "--model", model]]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"obcache {command[0]}: error: cannot load")
    assert FAILED_LOADS[model] in err
    if model == "TRUNCATED":
        assert f"{str(truncated_folder)!r}: model.safetensors (" in err and ") is truncated or corrupt" in err
    assert not (tmp_path / "out").exists()


def write_rows(folder: Path, lines: list[str]) -> None:
    folder.mkdir()
    (folder / "results.jsonl").write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("line,message", [
    ("[1, 2]", "expected a JSON object (one result row), got a list"),
    ("{}", "not a result row: it has no 'task' string"),
    ('{"task": "fidelity", "mode": "teacher-forced"}', "a fidelity row lacks the field(s) model, seed, length"),
])
@pytest.mark.parametrize("command", [["report", "DIR"], ["eval", "fidelity", "--out", "DIR"]])
def test_a_results_line_of_the_wrong_shape_is_a_clear_error(line, message, command, tmp_path, capsys, no_model_loading):
    write_rows(tmp_path / "runs", [line])
    code, _, err = run([str(tmp_path / "runs") if arg == "DIR" else arg for arg in command], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"results.jsonl, line 1: {message}" in err


@pytest.mark.parametrize("value", ["0", "-3"])
def test_eval_rejects_non_positive_max_new_tokens_before_any_work(value, tmp_path, capsys, no_model_loading):
    code, _, err = run(["eval", "niah_single_number", "--out", str(tmp_path / "out"), "--max-new-tokens", value], capsys)
    assert code == 2 and f"max_new_tokens must be an int >= 1, got {value}" in err
    assert not (tmp_path / "out").exists()


def test_an_interrupted_eval_says_how_to_resume_and_the_same_command_finishes(tmp_path, capsys, monkeypatch):
    tokenizer = load_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer))
    monkeypatch.setattr(obcache.loading, "load_model", lambda *a, **k: (model, tokenizer))
    out = tmp_path / "out"
    argv = ["eval", "niah_single_number", "--out", str(out), "--lengths", "300", "--samples", "3", "--policies", "snapkv",
            "--scores", "attention", "--budgets", "0.5", "--window", "8", "--max-new-tokens", "2", "--no-progress"]
    prefill, calls = obcache.fanout.shared_prefill, []

    def interrupted_on_the_second_sample(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return prefill(*args, **kwargs)

    monkeypatch.setattr(obcache.fanout, "shared_prefill", interrupted_on_the_second_sample)
    code, _, err = run(argv, capsys)
    assert code == 130
    assert err == (f"obcache eval: interrupted; the rows already in {out / 'results.jsonl'} are kept; run the same "
                   "command again to resume (only the missing rows are computed)\n")
    first = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["sample"] for r in first] == [0, 0]  # full cache and snapkv of the sample that ended
    monkeypatch.setattr(obcache.fanout, "shared_prefill", prefill)
    code, printed, _ = run(argv, capsys)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert code == 0 and printed.strip() == str(out / "results.jsonl")
    assert rows[:2] == first and sorted(r["sample"] for r in rows) == [0, 0, 1, 1, 2, 2]


def test_demo_runs_end_to_end_on_a_tiny_model(tokenizer, model, capsys, monkeypatch):
    """The main job: the needle table (full cache, StreamingLLM, paper SnapKV, the recommended policy x 4 scores)
    and the long generation, whose bounded cache holds no more than decode budget + interval per head."""
    monkeypatch.setattr(obcache.loading, "load_model", lambda *a, **k: (model, tokenizer))
    code, out, _ = run(["demo", "--length", "400", "--long-tokens", "40", "--decode-budget", "32",
                        "--decode-interval", "4"], capsys)
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("| ")]
    labels = [line.split("|")[1].strip() for line in table]
    assert labels[1:5] == ["full cache", "streamingllm", "snapkv (paper) + attention", "snapkv (paper) + obc-joint"]
    assert labels[5:9] == [f"adakv(snapkv[sinks=4,kernel=15]+chunk8) + {score}" for score in
                           ("attention", "obc-value", "obc-key", "obc-joint")]
    bounded = next(line for line in table if line.startswith("| decoding("))
    assert int(float(bounded.split("|")[4])) < 32 + 4


def test_demo_shows_the_exact_match_beside_the_string_match(tokenizer, model, capsys, monkeypatch):
    """A repeated last digit contains the needle but is not it: 'contains' yes, 'exact' no."""
    import obcache.demo
    from obcache.evaluation.tasks import make_sample

    needle = make_sample("niah_single_number", tokenizer, 400, seed=0, depth=0.5).expected[0]
    answers = iter([f" {needle}.", f" {needle}8."] * 5)
    monkeypatch.setattr(obcache.loading, "load_model", lambda *a, **k: (model, tokenizer))
    monkeypatch.setattr(obcache.demo, "continue_greedy",
                        lambda *a, **k: tokenizer.encode(next(answers), add_special_tokens=False))
    code, out, _ = run(["demo", "--length", "400", "--decode-budget", "0", "--window", "8"], capsys)
    table = [[cell.strip() for cell in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| ")]
    assert code == 0 and table[0][1:4] == ["answer", "contains", "exact"]
    assert [row[1:4] for row in table[1:3]] == [[f"{needle}.", "yes", "yes"], [f"{needle}8.", "yes", "no"]]


def test_demo_rejects_bad_input_before_loading(capsys, no_model_loading):
    code, _, err = run(["demo", "--policy", "none"], capsys)
    assert code == 2 and "give a policy" in err
    code, _, err = run(["demo", "--decode-budget", "4"], capsys)
    assert code == 2 and "protected" in err


# ---------------------------------------------------------------- generate: the context is bounded before any work


@pytest.fixture(scope="module")
def default_limit() -> tuple[int, int]:
    """(max_position_embeddings, longest vocabulary entry) of the default model, read from its files."""
    folder = obcache.loading.cache_dir() / "models" / obcache.loading.DEFAULT_MODEL
    limit = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    added = [token["content"] for token in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]]
    return limit, max(map(len, [*vocab, *added]))


@pytest.fixture
def no_tokenizing(monkeypatch):
    """Fail loudly if the prompt is tokenized."""

    def refuse(*args, **kwargs):
        raise AssertionError("the prompt must not be tokenized here")

    monkeypatch.setattr("obcache.generation.build_prompt", refuse)


def test_a_giant_context_file_is_refused_from_its_size_alone(default_limit, tmp_path, capsys, no_model_loading,
                                                             no_tokenizing):
    limit, longest = default_limit
    context = tmp_path / "giant.txt"
    with open(context, "wb") as file:
        file.truncate(50_000_000)  # 50 MB (sparse: nothing is written)
    code, _, err = run(["generate", "--context-file", str(context), "--question", "Q?"], capsys)
    assert code == 2
    assert err == (f"obcache generate: error: context file {str(context)!r} has 50,000,000 bytes, so at least "
                   f"12,500,000 characters: the model's limit of {limit} positions (max_position_embeddings) holds at "
                   f"most {limit * longest:,} characters with this tokenizer (its longest token has {longest})\n")


def test_the_character_bound_is_exact_at_its_edge(default_limit, tmp_path, capsys, monkeypatch, no_model_loading):
    """limit x longest characters may fit (they are tokenized and counted); one more cannot (refused untokenized)."""
    limit, longest = default_limit
    most = limit * longest
    assert most % 6 == 0
    context = tmp_path / "context.txt"
    context.write_text(" hello" * (most // 6))
    code, _, err = run(["generate", "--context-file", str(context), "--no-chat-template"], capsys)
    tokens = len(load_tokenizer()(" hello" * (most // 6))["input_ids"])
    assert code == 2 and f"the prompt has {tokens} tokens" in err
    context.write_text(" hello" * (most // 6) + "!")
    monkeypatch.setattr("obcache.generation.build_prompt", lambda *a, **k: pytest.fail("tokenized"))
    code, _, err = run(["generate", "--context-file", str(context), "--no-chat-template"], capsys)
    assert code == 2 and f"has {most + 1:,} characters: the model's limit of {limit} positions" in err


def test_a_prompt_longer_than_the_model_window_is_refused_before_the_weights_load(tmp_path, capsys, monkeypatch):
    """The limit comes from the config, the count from the tokenizer: no weights are read."""
    folder = tmp_path / "model"
    small = tiny_model()
    small.config.max_position_embeddings = 64
    small.save_pretrained(folder)
    tokenizer = load_tokenizer()
    tokenizer.save_pretrained(folder)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    context = tmp_path / "context.txt"
    context.write_text(" hello" * 70)
    tokens = len(tokenizer(" hello" * 70)["input_ids"])
    assert tokens > 64
    capsys.readouterr()  # save_pretrained's progress bar
    code, _, err = run(["generate", "--context-file", str(context), "--no-chat-template", "--model", str(folder)], capsys)
    assert code == 2
    assert err == (f"obcache generate: error: the prompt has {tokens} tokens, more than the model's limit of 64 "
                   "positions (max_position_embeddings); shorten the context\n")
    context.write_text(" hello" * 40)  # fits, but not with the answer
    tokens = len(tokenizer(" hello" * 40)["input_ids"])
    code, _, err = run(["generate", "--context-file", str(context), "--no-chat-template", "--model", str(folder),
                        "--max-new-tokens", "30"], capsys)
    assert code == 2 and f"the prompt ({tokens} tokens) plus max_new_tokens=30 pass" in err
    assert f"lower max_new_tokens to {64 - tokens} or shorten the context" in err


@pytest.mark.parametrize("text", ["", " \n\t\n  "])
def test_an_empty_context_file_is_refused_before_the_model_loads(text, tmp_path, capsys, no_model_loading):
    context = tmp_path / "context.txt"
    context.write_text(text)
    code, _, err = run(["generate", "--context-file", str(context), "--question", "Q?"], capsys)
    kind = "empty" if not text else "whitespace only"
    assert code == 2
    assert err == (f"obcache generate: error: context file {str(context)!r} is {kind}: give a text file with the "
                   "context to compress\n")


@pytest.mark.parametrize("error,line", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "out of memory (OutOfMemoryError): CUDA out of memory. Tried to allocate 2.00 GiB"),
    (MemoryError(), "out of memory (MemoryError)"),
    (RuntimeError("expected a tensor\n  of shape [2, 3]"), "RuntimeError: expected a tensor of shape [2, 3]"),
    (SafetensorError("Error while deserializing header: header too small"),
     "SafetensorError: Error while deserializing header: header too small"),
])
def test_runtime_failures_are_one_line_without_a_traceback(error, line, tmp_path, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(obcache.loading, "load_model", fail)
    context = tmp_path / "context.txt"
    context.write_text("some context")
    code, _, err = run(["generate", "--context-file", str(context), "--question", "Q?"], capsys)
    assert code == 1 and err == f"obcache generate: error: {line}\n"


def test_bits_and_byte_budget_wrap_the_policy_for_its_precision():
    from obcache.cli import build_parser
    from obcache.cli_args import policy_from_args

    def policy(*extra):
        return policy_from_args(build_parser().parse_args(["generate", "--context-file", "c", *extra]))

    quantized = policy("--bits", "4", "--group-size", "16")
    assert isinstance(quantized, obcache.Quantized) and quantized.bits == 4 and quantized.group_size == 16
    mixed = policy("--byte-budget", "0.05", "--decode-budget", "256")
    assert isinstance(mixed, obcache.Decoding) and isinstance(mixed.policy, obcache.MixedPrecision)
    assert mixed.policy.bits == (16, 8, 4) and mixed.policy.byte_budget == 0.05
