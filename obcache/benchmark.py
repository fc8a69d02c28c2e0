"""Benchmarks of eviction: time, memory and cache size, side by side in one run.

`obcache bench` (or `python benchmarks/run.py`) measures, for each context length
on one model:

- prefill without eviction vs prefill with SnapKV + obc-joint eviction, end to
  end, and the eviction time (scoring + top-k + gather, all 30 layers) of every
  policy x score, each as a fraction of the plain prefill;
- scoring time alone per layer for every score kind, vs `attention`;
- peak memory of prefill + eviction vs plain prefill, each in a fresh process
  (RSS high-water mark on CPU, reset after loading; max_memory_allocated on CUDA),
  with the model-load baseline;
- KV cache bytes after eviction vs budget x full bytes, and the kept shape;
- decode throughput at each budget vs the full cache (and the hooks' per-token cost);
- H2O full-history scoring of one layer: time and extra peak memory vs the cache.

The policy/score pairs are timed on states recorded from one prefill (like the
evaluation's fan-out), so a run stays short: two prefills per length here plus
two in the memory subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from obcache.cache import EvictableCache
from obcache.models import attention_layers, check_attention_implementation, check_supported_config
from obcache.policies import H2O, TOVA, LayerState, Policy, SnapKV, StreamingLLM
from obcache.scores import SCORE_KINDS, saliency

DEFAULT_LENGTHS = (2048, 4096, 8192)
DEFAULT_BUDGETS = (0.05, 0.1, 0.2, 0.5)
HEADLINE = ("snapkv", "obc-joint")  # the policy x score of the overhead target
TARGETS = {
    "overhead": 0.03, "joint_vs_attention": 1.5, "full_history_memory": 0.10,
    "peak_memory": 1.05, "cache_bytes": 0.01, "decode_speedup": 1.6,
}


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), help="context lengths in tokens")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(DEFAULT_BUDGETS), help="fractions kept, for decode and cache bytes")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per throughput measurement")
    parser.add_argument("--window", type=int, default=16, help="query window of H2O / SnapKV")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each per-layer scoring timing")
    parser.add_argument("--model", default=None, help="model alias or folder (default SmolLM2-135M-Instruct)")
    parser.add_argument("--random-weights", choices=sorted(RANDOM_SHAPES), default=None,
                        help="random weights of this shape instead of a checkpoint (timing/memory only)")
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bf16 on CUDA)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU (default 2)")
    parser.add_argument("--out", default="bench-results.json", help="JSON results file")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-full-history", action="store_true", help="skip the H2O full-history measurement")


def register(commands) -> argparse.ArgumentParser:
    """Add the `bench` subcommand to an argparse subparsers object."""
    parser = commands.add_parser("bench", help="time, memory and cache size of eviction vs the full cache",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


# ---------------------------------------------------------------- helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def _prompt(length: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random prompt (timing and memory do not depend on the text)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(100, vocab - 1, (1, length), generator=generator).to(device)


def _grid(budget: float, window: int) -> list[tuple[str, str, Policy]]:
    pairs = [(cls.name, score, cls(budget=budget, score=score, **({} if cls is TOVA else {"window": window})))
             for cls in (SnapKV, H2O, TOVA) for score in SCORE_KINDS]
    return pairs + [("streamingllm", "-", StreamingLLM(budget=budget))]


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        keep = ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache")
        info["lscpu"] = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines())
                         if k.strip() in keep}
    except (OSError, subprocess.CalledProcessError):
        pass
    info["torch_threads"] = torch.get_num_threads()
    info["loadavg_start"] = os.getloadavg()
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


# ---------------------------------------------------------------- recorded prefill


class Recorder:
    """During one plain prefill, keep what each layer's policy would see (by reference, plus small copies).

    Windows need only the last rows of the hidden states and attention outputs;
    `full_layer` keeps all rows (for the H2O full-history measurement).
    """

    def __init__(self, model, rows: int, full_layer: int):
        self.adapter = check_supported_config(model.config)
        check_attention_implementation(model)
        self.attentions = attention_layers(model)
        self.rows, self.full_layer = rows, full_layer
        self.saved: dict[int, dict] = {}
        self._outputs: dict[int, torch.Tensor] = {}

    def __enter__(self):
        self._handles = []
        for attention in self.attentions:
            idx = attention.layer_idx
            projection = getattr(attention, self.adapter.output_projection)
            self._handles.append(projection.register_forward_pre_hook(
                lambda module, args, idx=idx: self._outputs.__setitem__(idx, args[0])))
            self._handles.append(attention.register_forward_hook(self._record, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()

    def _record(self, module, args, kwargs, output):
        idx = module.layer_idx
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        outputs = self._outputs.pop(idx)
        keep = hidden.shape[1] if idx == self.full_layer else min(self.rows, hidden.shape[1])
        self.saved[idx] = {
            "module": module, "length": hidden.shape[1],
            "hidden": hidden[:, -keep:].clone(), "outputs": outputs[:, -keep:].clone(),
            "cos": cos[:, -keep:].clone(), "sin": sin[:, -keep:].clone(),
        }

    def state(self, cache: EvictableCache, idx: int) -> LayerState:
        saved, layer = self.saved[idx], cache.layers[idx]
        module, length = saved["module"], saved["length"]
        offset = length - saved["hidden"].shape[1]
        heads = module.config.num_attention_heads

        def queries(first: int, last: int) -> torch.Tensor:
            a, b = first - offset, last - offset
            if a < 0:
                raise ValueError("benchmark recorder: query rows before the recorded window")
            return self.adapter.queries(module, saved["hidden"][:, a:b], saved["cos"][:, a:b], saved["sin"][:, a:b])

        def outputs(first: int, last: int) -> torch.Tensor:
            rows = saved["outputs"][:, first - offset:last - offset]
            return rows.view(rows.shape[0], rows.shape[1], heads, -1).transpose(1, 2)

        return LayerState(keys=layer.keys, values=layer.values, scaling=module.scaling, query_heads=heads,
                          key_mask=None, queries=queries, outputs=outputs)


def _forward(model, ids, cache, positions=None):
    return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, position_ids=positions)


# ---------------------------------------------------------------- measurements


def measure_eviction(recorder, cache, grid, device) -> dict:
    """Seconds of select + gather over all layers, per policy x score (the eviction step as the hook runs it)."""
    totals = {}
    for name, score, policy in grid:
        seconds = 0.0
        for idx in sorted(recorder.saved):
            state = recorder.state(cache, idx)

            def step():
                with torch.no_grad():
                    indices = policy.select(state)
                    if indices is not None:
                        index = indices.unsqueeze(-1).expand(-1, -1, -1, state.keys.shape[-1])
                        return state.keys.gather(2, index), state.values.gather(2, index)

            seconds += _timed(step, device)[1]
        totals[f"{name}/{score}"] = seconds
    return totals


def measure_scoring(recorder, cache, window: int, repeats: int, device) -> dict:
    """Median seconds per layer of `saliency` alone (window queries precomputed), per score kind.

    `<kind>` uses the attention outputs captured from the forward (what the hooks
    do); `<kind> (recomputed o)` recomputes them (the library's path without capture).
    """
    times: dict[str, list[float]] = {}
    layers = sorted(recorder.saved)
    inputs = {}
    with torch.no_grad():
        for idx in layers:
            state = recorder.state(cache, idx)
            q, o = state.window(state.length - window, state.length)
            inputs[idx] = (q, o, state)
    for _ in range(repeats):  # the floor of every score: one W x L x d product of window queries and keys
        for idx in layers:
            q, _, state = inputs[idx]
            qf = q.float().reshape(q.shape[0], state.keys.shape[1], -1, q.shape[-1])
            kf = state.keys.float()
            times.setdefault("q.k product alone", []).append(_timed(lambda: torch.matmul(qf, kf.mT), device)[1])
    variants = [(kind, True) for kind in SCORE_KINDS] + [(k, False) for k in ("obc-key", "obc-joint", "exact-removal")]
    for _ in range(repeats):
        for idx in layers:
            q, o, state = inputs[idx]
            for kind, captured in variants:
                label = kind if captured else f"{kind} (recomputed o)"
                fn = lambda: saliency(q, state.keys, state.values, kind, scaling=state.scaling,  # noqa: E731
                                      outputs=o if captured else None)
                with torch.no_grad():
                    times.setdefault(label, []).append(_timed(fn, device)[1])
    return {label: statistics.median(values) for label, values in times.items()}


def measure_full_history(recorder, cache, score: str, device) -> dict:
    """H2O full-history scores of the recorded full layer: time and extra peak memory vs the cache."""
    idx = recorder.full_layer
    state = recorder.state(cache, idx)
    policy = H2O(budget=0.1, score=score, full_history=True)
    length = state.length
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            _, seconds = _timed(lambda: policy.token_scores(state), device)
            extra = torch.cuda.max_memory_allocated(device) - base
            largest = None
        else:
            extra, largest, seconds = _cpu_peak(lambda: policy.token_scores(state))
    layer_bytes = state.keys.nbytes + state.values.nbytes
    heads = state.query_heads
    return {
        "layer": idx, "score": score, "seconds": seconds, "extra_peak_bytes": extra, "largest_allocation": largest,
        "layer_cache_bytes": layer_bytes, "cache_bytes": layer_bytes * len(recorder.saved),
        "l_by_l_bytes": heads * length * length * 4, "chunk_rows": max(1, policy.chunk_elements // (heads * length)),
    }


def _cpu_peak(fn) -> tuple[int, int, float]:
    """(peak bytes allocated above the start, largest single allocation, seconds) via the torch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    events.sort(key=lambda e: e["ts"])
    current = peak = largest = 0
    for event in events:
        current += event["args"]["Bytes"]
        peak = max(peak, current)
        largest = max(largest, event["args"]["Bytes"])
    return peak, largest, seconds


def measure_decode(model, ids, cache, recorder, budgets, window, new_tokens, device, rounds: int = 2) -> dict:
    """Tokens/s over `new_tokens` greedy steps: full cache, and SnapKV + obc-joint at each budget.

    Every configuration decodes `rounds` times on a fresh copy of its cache, the
    rounds interleaved across configurations; the best round is reported.
    """

    def decode(evicted, hooks) -> float:
        token = ids[:, -1:]
        with hooks, torch.no_grad():
            _forward(model, token, evicted, evicted.positions_for(1, device))  # warm-up step

            def steps():
                nonlocal token
                for _ in range(new_tokens):
                    logits = _forward(model, token, evicted, evicted.positions_for(1, device)).logits
                    token = logits[:, -1].argmax(-1, keepdim=True)

            return new_tokens / _timed(steps, device)[1]

    layers = sorted(recorder.saved)
    results, runs = {}, []  # runs: (key, field, indices, policy or None)
    for budget in budgets:
        policy = SnapKV(budget=budget, window=window, score="obc-joint")
        with torch.no_grad():
            indices = [policy.select(recorder.state(cache, idx)) for idx in layers]
        evicted = cache.subset(indices)
        entry = {
            "kept_tokens": evicted.kept_tokens()[0], "cache_bytes": evicted.nbytes(), "full_bytes": evicted.full_bytes,
            "expected_bytes": budget * evicted.full_bytes, "kept_shape": list(evicted.layers[0].keys.shape),
        }
        entry["bytes_error"] = entry["cache_bytes"] / entry["expected_bytes"] - 1
        results[str(budget)] = entry
        runs.append((str(budget), "tokens_per_s", indices, policy))
        if budget == 0.1:
            runs.append((str(budget), "tokens_per_s_without_hooks", indices, None))
        del evicted
    results["full"] = {"cache_bytes": cache.nbytes()}
    runs.append(("full", "tokens_per_s", [None] * len(layers), None))
    for _ in range(rounds):
        for key, field, indices, policy in runs:
            fresh = cache.subset(indices)
            speed = decode(fresh, policy.attach(model) if policy is not None else nullcontext())
            results[key][field] = max(speed, results[key].get(field, 0.0))
            del fresh
    return results


# ---------------------------------------------------------------- peak memory in a fresh process


def _read_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# Shapes for --random-weights: speed and memory do not depend on the weights' values, so a GPU
# machine can be benchmarked without shipping checkpoints (and at a scale the CPU cannot run).
RANDOM_SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                         tie_word_embeddings=False),
}


def load_benchmark_model(name: str | None, random_weights: str | None, attn: str, dtype, device):
    """The model to measure: a real checkpoint (load_model) or random weights of a known shape."""
    from obcache.loading import load_model, resolve_dtype

    if random_weights is None:
        return load_model(name, attn_implementation=attn, dtype=dtype, device=device)[0]
    from transformers import AutoModelForCausalLM, LlamaConfig

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = LlamaConfig(**RANDOM_SHAPES[random_weights], attn_implementation=attn)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, device))
    return model.eval()


def memory_worker(config: dict) -> dict:
    """One prefill (plain or with SnapKV + obc-joint) in this fresh process; its peak memory."""
    torch.set_num_threads(config["threads"])
    model = load_benchmark_model(config["model"], config["random_weights"], config["attn"], config["dtype"], config["device"])
    device = model.device
    ids = _prompt(config["length"], model.config.vocab_size, device)
    policy = SnapKV(budget=0.1, window=config["window"], score="obc-joint") if config["evict"] else None
    result: dict = {"evict": config["evict"], "length": config["length"]}
    with torch.no_grad():  # touch every weight once, so the baseline counts the resident model
        _forward(model, ids[:, :16], EvictableCache(config=model.config))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["baseline_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        result["baseline_bytes"] = _read_status("VmRSS")
        result["load_peak_bytes"] = _read_status("VmHWM")
        try:  # "5" resets the RSS high-water mark (Linux >= 4.0): the peak below is the prefill's own
            Path("/proc/self/clear_refs").write_text("5")
            result["hwm_reset"] = True
        except OSError:
            result["hwm_reset"] = False
    cache = EvictableCache(config=model.config)
    with (policy.attach(model) if policy else nullcontext()), torch.no_grad():
        _, result["prefill_seconds"] = _timed(lambda: _forward(model, ids, cache), device)
    result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _read_status("VmHWM")
    result["cache_bytes"] = cache.nbytes()
    result["eviction_seconds"] = cache.eviction_seconds
    return result


def run_memory_worker(config: dict) -> dict:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "obcache.benchmark", "--memory-worker", json.dumps(config)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the run


def bench_length(model, length: int, args, device) -> dict:
    ids = _prompt(length, model.config.vocab_size, device)
    result: dict = {"length": length}
    layers = len(model.get_decoder().layers)
    recorder = Recorder(model, rows=max(args.window, 1), full_layer=layers // 2)
    cache = EvictableCache(config=model.config)
    with recorder, torch.no_grad():
        _, result["prefill_seconds"] = _timed(lambda: _forward(model, ids, cache), device)
    name, score = HEADLINE
    policy = SnapKV(budget=0.1, window=args.window, score=score)
    hooked = EvictableCache(config=model.config)
    with policy.attach(model), torch.no_grad():
        _, result["prefill_evict_seconds"] = _timed(lambda: _forward(model, ids, hooked), device)
    result["hook_eviction_seconds"] = hooked.eviction_seconds
    result["hook_cache_bytes"], result["hook_full_bytes"] = hooked.nbytes(), hooked.full_bytes
    del hooked
    result["eviction_seconds"] = measure_eviction(recorder, cache, _grid(0.1, args.window), device)
    result["scoring_seconds"] = measure_scoring(recorder, cache, args.window, args.repeats, device)
    result["decode"] = measure_decode(model, ids, cache, recorder, args.budgets, args.window, args.new_tokens, device)
    if not args.no_full_history:
        result["full_history"] = [measure_full_history(recorder, cache, s, device) for s in ("attention", "obc-joint")]
    del cache, recorder
    if not args.no_memory:
        base = {"length": length, "model": args.model, "random_weights": args.random_weights, "attn": args.attn, "dtype": args.dtype,
                "device": str(device), "threads": args.threads, "window": args.window}
        result["memory"] = {"plain": run_memory_worker({**base, "evict": False}),
                            "evict": run_memory_worker({**base, "evict": True})}
    return result


def run(args: argparse.Namespace) -> dict:
    if args.random_weights is not None and args.model is not None:
        raise ValueError("give --model or --random-weights, not both")
    if any(length < 2 * args.window for length in args.lengths):
        raise ValueError(f"every length must be at least twice the window ({args.window})")
    if any(not 0 < b <= 1 for b in args.budgets):
        raise ValueError("budgets are fractions kept, in (0, 1]")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    model = load_benchmark_model(args.model, args.random_weights, args.attn, args.dtype, device)
    report = {"machine": machine(), "device": str(device), "dtype": str(model.dtype), "attn": args.attn,
              "model": f"random weights, {args.random_weights} shape" if args.random_weights else args.model or "smollm2-135m-instruct", "window": args.window, "new_tokens": args.new_tokens,
              "command": " ".join(sys.argv), "kv_heads": model.config.num_key_value_heads,
              "query_heads": model.config.num_attention_heads, "lengths": []}
    with torch.no_grad():  # warm-up, with and without eviction: first-call costs stay out of the timings
        warm = _prompt(256, model.config.vocab_size, device)
        _forward(model, warm, EvictableCache(config=model.config))
        with SnapKV(budget=0.1, window=args.window, score="obc-joint").attach(model):
            _forward(model, warm, EvictableCache(config=model.config))
    for length in args.lengths:
        print(f"obcache bench: {length} tokens ...", file=sys.stderr, flush=True)
        report["lengths"].append(bench_length(model, length, args, device))
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["targets"] = check_targets(report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(format_report(report))
    print(f"results written to {args.out}", file=sys.stderr)
    return report


# ---------------------------------------------------------------- report


def check_targets(report: dict) -> list[dict]:
    """The issue's targets, evaluated at the longest length measured."""
    row = max(report["lengths"], key=lambda r: r["length"])
    out = []

    def add(name, value, limit, met, unit=""):
        out.append({"target": name, "length": row["length"], "value": value, "limit": limit, "met": bool(met), "unit": unit})

    overhead = row["eviction_seconds"]["/".join(HEADLINE)] / row["prefill_seconds"]
    add("SnapKV + obc-joint eviction overhead (fraction of prefill)", overhead, TARGETS["overhead"], overhead <= TARGETS["overhead"])
    s = row["scoring_seconds"]
    ratio = s["obc-joint"] / s["attention"]
    add("obc-joint scoring / attention scoring", ratio, TARGETS["joint_vs_attention"], ratio <= TARGETS["joint_vs_attention"])
    for entry in row.get("full_history", []):
        frac = entry["extra_peak_bytes"] / entry["cache_bytes"]
        add(f"H2O full-history ({entry['score']}) extra peak / KV cache", frac, TARGETS["full_history_memory"],
            frac < TARGETS["full_history_memory"] and entry["extra_peak_bytes"] < entry["l_by_l_bytes"])
    if "memory" in row:
        m = row["memory"]
        ratio = m["evict"]["peak_bytes"] / m["plain"]["peak_bytes"]
        add("peak memory prefill+eviction / plain prefill", ratio, TARGETS["peak_memory"], ratio <= TARGETS["peak_memory"])
    decode = row["decode"]
    for key, entry in decode.items():
        if key != "full":
            add(f"cache bytes error at budget {key} (GQA shape {entry['kept_shape']})", entry["bytes_error"],
                TARGETS["cache_bytes"], abs(entry["bytes_error"]) <= TARGETS["cache_bytes"] and entry["kept_shape"][1] == report["kv_heads"])
    if "0.1" in decode:
        speedup = decode["0.1"]["tokens_per_s"] / decode["full"]["tokens_per_s"]
        add("decode speed at budget 0.1 / full cache", speedup, TARGETS["decode_speedup"], speedup >= TARGETS["decode_speedup"])
    return out


def _mb(n) -> str:
    return f"{n / 2**20:.1f}" if n is not None else "-"


def format_report(report: dict) -> str:
    rows = report["lengths"]
    head = "| " + " | ".join(["measure", *(f"{r['length']}" for r in rows)]) + " |"
    line = "|" + "---|" * (len(rows) + 1)
    table = [f"device {report['device']}, dtype {report['dtype']}, attn {report['attn']}, "
             f"torch threads {report['machine']['torch_threads']}", "", head, line]

    def add(label, values):
        table.append("| " + " | ".join([label, *values]) + " |")

    add("prefill, no eviction (s)", [f"{r['prefill_seconds']:.2f}" for r in rows])
    add("prefill + SnapKV/obc-joint eviction (s)", [f"{r['prefill_evict_seconds']:.2f} ({r['prefill_evict_seconds'] / r['prefill_seconds']:.3f}x)" for r in rows])
    add("  eviction inside that prefill (s)", [f"{r['hook_eviction_seconds']:.3f} ({r['hook_eviction_seconds'] / r['prefill_seconds']:.2%})" for r in rows])
    for key in rows[0]["eviction_seconds"]:
        add(f"eviction {key} (% of prefill)", [f"{r['eviction_seconds'][key] / r['prefill_seconds']:.2%}" for r in rows])
    for key in rows[0]["scoring_seconds"]:
        add(f"scoring/layer {key} (ms, x attention)",
            [f"{r['scoring_seconds'][key] * 1e3:.2f} ({r['scoring_seconds'][key] / r['scoring_seconds']['attention']:.2f}x)" for r in rows])
    for key in rows[0]["decode"]:
        if key == "full":
            add("decode full cache (tok/s)", [f"{r['decode']['full']['tokens_per_s']:.1f}" for r in rows])
            continue
        add(f"decode budget {key} (tok/s, x full)", [f"{r['decode'][key]['tokens_per_s']:.1f} ({r['decode'][key]['tokens_per_s'] / r['decode']['full']['tokens_per_s']:.2f}x)" for r in rows])
        if "tokens_per_s_without_hooks" in rows[0]["decode"][key]:
            add(f"  same, hooks detached (tok/s)", [f"{r['decode'][key]['tokens_per_s_without_hooks']:.1f}" for r in rows])
        add(f"cache MiB at {key}: kept / budget x full (error)",
            [f"{_mb(r['decode'][key]['cache_bytes'])} / {_mb(r['decode'][key]['expected_bytes'])} ({r['decode'][key]['bytes_error']:+.2%}) {r['decode'][key]['kept_shape']}" for r in rows])
    if "full_history" in rows[0]:
        for i, entry in enumerate(rows[0]["full_history"]):
            add(f"H2O full-history {entry['score']}, 1 layer: s, extra peak MiB (% of KV cache; L x L would be)",
                [f"{r['full_history'][i]['seconds']:.2f} s, {_mb(r['full_history'][i]['extra_peak_bytes'])} "
                 f"({r['full_history'][i]['extra_peak_bytes'] / r['full_history'][i]['cache_bytes']:.1%}; "
                 f"{_mb(r['full_history'][i]['l_by_l_bytes'])})" for r in rows])
    if "memory" in rows[0]:
        what = "GPU max allocated" if report["device"].startswith("cuda") else "peak RSS"
        add(f"{what} after model load (MiB)", [_mb(r["memory"]["plain"]["baseline_bytes"]) for r in rows])
        add(f"{what} plain prefill (MiB)", [_mb(r["memory"]["plain"]["peak_bytes"]) for r in rows])
        add(f"{what} prefill + eviction (MiB, x plain)",
            [f"{_mb(r['memory']['evict']['peak_bytes'])} ({r['memory']['evict']['peak_bytes'] / r['memory']['plain']['peak_bytes']:.3f}x)" for r in rows])
    table += ["", "targets (at the longest length):"]
    for t in report["targets"]:
        table.append(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']:.4g} (limit {t['limit']})")
    return "\n".join(table)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        print(json.dumps(memory_worker(json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
