"""The evaluation grid: every policy x score x budget on every sample, one prefill per sample.

    spec = EvalSpec(task="niah_single_number", policies=("snapkv",), scores=("attention", "obc-joint"),
                    budgets=(0.05, 0.1), lengths=(2048,), samples=3, out=Path("runs/niah"))
    run_eval(spec)        # appends rows to runs/niah/results.jsonl; a rerun resumes

The spec and its checks live in spec.py, the results file in store.py, and
each task family (needle tasks, `fidelity`, `oracle`) in families.py; this
module is the resume loop. The grid always has the full-cache row, and
StreamingLLM once per budget when asked. A sample is (length, depth, sample
index); its generator seed is `seed + index`. Rows are appended to
`out/results.jsonl` as each sample ends; a rerun computes only the rows whose
key (store.row_key, which includes the run's settings) is not there yet, and
only if the rows there of the same model name came from the same model
(store.check_model_identity).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from obcache.evaluation.families import ALL_TASKS, family_of
from obcache.evaluation.spec import FULL, EvalSpec, build_grid, check_spec, run_settings
from obcache.evaluation.store import RESULTS_FILE, append_rows, check_model_identity, read_rows, row_key

__all__ = ["ALL_TASKS", "FULL", "RESULTS_FILE", "EvalSpec", "build_grid", "read_rows", "row_key", "run_eval"]


def _units(spec: EvalSpec) -> Iterator[tuple[int, float | None, int]]:
    for length in spec.lengths:
        for depth in family_of(spec.task).depths(spec):
            for index in range(spec.samples):
                yield length, depth, index


def _check_model_settings(spec: EvalSpec, model, settings: dict) -> None:
    """A preloaded model must have the dtype and attention the rows will record."""
    actual = {"dtype": str(model.dtype).removeprefix("torch."), "attn": model.config._attn_implementation}
    wrong = [f"{name} {actual[name]} (the spec says {settings[name]})" for name in actual if actual[name] != settings[name]]
    if wrong:
        raise ValueError(f"the model has {', '.join(wrong)}; give the spec the model's dtype and attn")


def _make_output_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"output folder {str(out)!r} cannot be created: {error}") from None


def run_eval(spec: EvalSpec, *, model=None, tokenizer=None, progress: bool = True) -> Path:
    """Run (or resume) the grid; return the results file.

    `model`/`tokenizer`: preloaded (the model `spec.model` names, with the
    spec's dtype and attention); otherwise the model is loaded only if some row
    is missing, and the output folder is created only after it loaded.
    """
    from tqdm import tqdm

    import obcache
    import transformers
    from obcache.loading import DEFAULT_MODEL, load_model, model_identity

    grid = check_spec(spec)
    family = family_of(spec.task)
    path = spec.out / RESULTS_FILE
    rows = read_rows(path, repair=True)
    name, identity = spec.model or DEFAULT_MODEL, model_identity(spec.model)
    check_model_identity(path, rows, name, identity)
    done = {row_key(row) for row in rows}
    settings = run_settings(spec)
    base = {"model": name, "model_identity": identity, "task": spec.task, "seed": spec.seed, "mode": spec.mode,
            "settings": settings}
    todo = []
    for length, depth, index in _units(spec):
        unit = {**base, "length": length, "depth": depth, "sample": index}
        missing = [fields for fields in family.expected_rows(spec, grid, length) if row_key({**unit, **fields}) not in done]
        if missing:
            todo.append((unit, missing))
    if not todo:
        return path
    if model is None:
        model, tokenizer = load_model(spec.model, attn_implementation=spec.attn, dtype=spec.dtype, device=spec.device)
    _check_model_settings(spec, model, settings)
    family.check_model(spec, model, tokenizer)
    _make_output_folder(spec.out)
    versions = {"obcache": obcache.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    total = sum(len(missing) for _, missing in todo)
    with tqdm(total=total, desc=f"{spec.task} ({spec.mode})", unit="row", file=sys.stderr, disable=not progress) as bar:
        for unit, missing in todo:
            start, before = time.perf_counter(), bar.n
            wanted = {(f["policy"], f["score"], f["budget"]) for f in missing}
            policies = {key: policy for key, policy in grid.items() if key in wanted}
            rows = family.rows(spec, model, tokenizer, unit, policies, grid, bar.update)
            seconds = time.perf_counter() - start
            rows = [{**unit, **row, "versions": versions, "sample_seconds": seconds} for row in rows]
            append_rows(path, [row for row in rows if row_key(row) not in done])
            bar.update(len(missing) - (bar.n - before))
    return path
