"""The command line: help, budgets, errors before any model work, generate end to end on a tiny model."""

from __future__ import annotations

import pytest

import obcache.loading
from obcache import cli
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
    for name in ("h2o", "tova", "snapkv", "streamingllm", "attention", "obc-value", "obc-key", "obc-joint", "exact-removal"):
        assert name in out
    assert "KEPT" in out


@pytest.mark.parametrize("text,value", [("0.1", 0.1), ("1.0", 1.0), ("256", 256), ("1", 1), ("5e-2", 0.05)])
def test_parse_budget(text, value):
    parsed = cli.parse_budget(text)
    assert parsed == value and type(parsed) is type(value)


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded for bad input")

    monkeypatch.setattr(obcache.loading, "load_model", refuse)


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
    ],
)
def test_bad_input_fails_before_loading_the_model(extra, message, tmp_path, capsys, no_model):
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
