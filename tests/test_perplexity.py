"""Streaming perplexity against one teacher-forced forward with a hand-built attention mask."""

from __future__ import annotations

import math

import pytest
import torch

from obcache import Decoding, H2O, StreamingLLM
from obcache.evaluation.perplexity import stream
from tests.conftest import tiny_model

LENGTH, CHUNK = 120, 16


def document(seed: int = 4) -> list[int]:
    return torch.randint(1, 512, (LENGTH,), generator=torch.Generator().manual_seed(seed)).tolist()


def nll_of_one_forward(model, ids, visible=None):
    """NLL of tokens 1..n-1 from one plain forward; `visible` [n, n] bool = which keys each query sees."""
    tensor = torch.tensor([ids])
    mask = None if visible is None else visible[None, None]
    with torch.no_grad():
        logits = model(input_ids=tensor, attention_mask=mask).logits[0].float()
    return (-torch.log_softmax(logits[:-1], -1).gather(-1, tensor[0, 1:, None])[:, 0]).tolist()


def test_full_cache_stream_equals_one_forward():
    model = tiny_model()
    ids = document()
    streamed = stream(model, ids, None, chunk=CHUNK)
    torch.testing.assert_close(torch.tensor(streamed.nll), torch.tensor(nll_of_one_forward(model, ids)), rtol=1e-4, atol=1e-4)
    assert math.isclose(streamed.perplexity, math.exp(sum(streamed.nll) / (LENGTH - 1)))
    assert streamed.kept_tokens == LENGTH


def test_streaming_llm_stream_equals_the_sink_and_window_mask():
    """Once a chunk fills the cache to budget + interval, it is cut to the 4 sinks and the latest budget - 4."""
    model = tiny_model()
    ids, budget, sinks = document(), 40, 4
    policy = Decoding(StreamingLLM(budget=budget, sinks=sinks), capacity=budget, interval=CHUNK)
    streamed = stream(model, ids, policy, chunk=CHUNK)
    visible = torch.zeros(LENGTH, LENGTH, dtype=torch.bool)
    held: list[int] = []
    for start in range(0, LENGTH, CHUNK):
        rows = slice(start, start + CHUNK)
        visible[rows, held] = True
        visible[rows, rows] = torch.ones(CHUNK, CHUNK, dtype=torch.bool).tril()[: LENGTH - start, : LENGTH - start]
        held += list(range(start, min(start + CHUNK, LENGTH)))
        if len(held) >= budget + CHUNK:
            held = held[:sinks] + held[-(budget - sinks):]
    torch.testing.assert_close(torch.tensor(streamed.nll), torch.tensor(nll_of_one_forward(model, ids, visible)),
                               rtol=1e-4, atol=1e-4)
    assert streamed.kept_tokens == len(held)


def test_a_bounded_cache_changes_the_perplexity_and_stays_bounded():
    model = tiny_model()
    ids = document()
    full = stream(model, ids, None, chunk=CHUNK)
    bounded = stream(model, ids, Decoding(H2O(budget=24, window=4, sinks=4, score="obc-joint"), capacity=24, interval=CHUNK),
                     chunk=CHUNK)
    assert bounded.kept_tokens <= 24 + CHUNK and bounded.cache_bytes < full.cache_bytes / 2
    assert bounded.perplexity != pytest.approx(full.perplexity, rel=1e-4)
    assert len(bounded.bucket_perplexities(50)) == 3


def test_the_perplexity_task_runs_resumes_and_reports(model, tokenizer, tmp_path):
    from obcache.evaluation.report import write_report
    from obcache.evaluation.runner import EvalSpec, read_rows, run_eval
    from obcache.evaluation.spec import check_spec

    spec = EvalSpec(task="perplexity", policies=("h2o", "streamingllm"), scores=("attention", "obc-joint"),
                    budgets=(32, 64), lengths=(200,), samples=1, out=tmp_path / "ppl", options={"window": 4, "sinks": 4},
                    stream_chunk=16)
    rows = read_rows(run_eval(spec, model=model, tokenizer=tokenizer, progress=False))
    assert len(rows) == 1 + 2 * 2 + 2  # full + h2o x scores x budgets + streaming x budgets
    full = next(r for r in rows if r["policy"] == "full")
    assert full["kept_tokens"] == 200 and len(full["bucket_perplexities"]) == 1
    for row in rows:
        if row["policy"] != "full":
            assert row["kept_tokens"] < row["budget"] + 16 + 1 and row["perplexity"] != full["perplexity"]
    assert len(read_rows(run_eval(spec, model=model, tokenizer=tokenizer, progress=False))) == len(rows)  # resumed
    report = write_report(spec.out).read_text()
    assert "perplexity (streaming)" in report and "_positions.png" in report
    with pytest.raises(ValueError, match="token counts"):
        check_spec(EvalSpec(task="perplexity", budgets=(0.1,), out=tmp_path / "bad"))
