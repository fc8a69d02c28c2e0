"""obcache against kvpress (NVIDIA's KV-compression library) on the same model, context and budget.

kvpress 0.5.5 needs transformers < 5.3, so it runs in its own environment:

    python -m venv --system-site-packages /tmp/kvenv
    /tmp/kvenv/bin/pip install --no-deps kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 cachetools
    /tmp/kvenv/bin/pip install datasets fire typer-slim httpx
    python scripts/peer_kvpress.py --kvpress-python /tmp/kvenv/bin/python --length 2048

Every configuration runs in a fresh process (so that its peak RSS is its own), on the default model's
float32 copy, 2 threads: the prefill with compression (one warm-up, then the median of 3; KVzip: one
run), the K/V bytes the cache holds after it, the peak RSS over the loaded model, and greedy decoding
speed over 32 tokens on the compressed cache (after 32 warm-up tokens). Every configuration runs in
`--rounds` rounds (each round in the other order), and the table shows the median over rounds. Each
library's own plain prefill and decoding are measured in its own environment, and ratios are to those.
This file imports neither library at the top: each side imports its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

CONFIGS = ("none", "snapkv", "adakv(snapkv)", "kvzip")
DECODE_TOKENS = 32
#: Prefills timed per configuration (the median is kept). KVzip once: three of kvpress's KVzipPress prefills
#: at 2048 tokens in one process exhausted this 24 GiB machine (one takes over 14 GiB).
REPEATS = {"kvzip": 1}


def model_path() -> str:
    return os.path.join(os.environ.get("OBCACHE_HOME", os.path.expanduser("~/.cache/obcache")), "models",
                        "smollm2-135m-instruct")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.kv_nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def run_obcache(config: str, ids: torch.Tensor, kept: float) -> tuple:
    import obcache

    model, _ = obcache.load_model()
    tokenizer = obcache.load_tokenizer()
    snapkv = dict(budget=kept, window=64, kernel=5, score="attention")
    policy = {"none": None, "snapkv": lambda: obcache.SnapKV(**snapkv),
              "adakv(snapkv)": lambda: obcache.AdaKV(obcache.SnapKV(**snapkv)),
              "kvzip": lambda: obcache.GlobalKV(obcache.KVzip(score="attention", budget=kept))}[config]

    def prefill():
        cache = obcache.EvictableCache(config=model.config)
        hooks = policy().attach(model, tokenizer=tokenizer) if policy else obcache.attach(model)
        with hooks, torch.no_grad():
            logits = model(input_ids=ids, past_key_values=cache, logits_to_keep=1).logits
        return cache, logits

    def decode(cache, token, offset):
        with obcache.attach(model), torch.no_grad():  # obcache's hooks place the tokens after the context
            for _ in range(DECODE_TOKENS):
                token = model(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)

    return model, prefill, decode


def run_kvpress(config: str, ids: torch.Tensor, kept: float) -> tuple:
    from contextlib import nullcontext

    from kvpress import AdaKVPress, KVzipPress, SnapKVPress
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(model_path(), dtype=torch.float32, attn_implementation="sdpa").eval()
    snapkv = lambda: SnapKVPress(compression_ratio=1 - kept, window_size=64, kernel_size=5)  # noqa: E731
    press = {"none": None, "snapkv": snapkv, "adakv(snapkv)": lambda: AdaKVPress(snapkv()),
             "kvzip": lambda: KVzipPress(compression_ratio=1 - kept)}[config]

    def prefill():
        cache = DynamicCache()
        with (press()(model) if press else nullcontext()), torch.no_grad():
            logits = model.model(input_ids=ids, past_key_values=cache).last_hidden_state[:, -1:]
        return cache, model.lm_head(logits)

    def decode(cache, token, offset):  # as kvpress's pipeline decodes: positions after the full context
        with torch.no_grad():
            for i in range(DECODE_TOKENS):
                position = torch.tensor([[offset + i]])
                token = model(input_ids=token, past_key_values=cache, position_ids=position).logits[:, -1:].argmax(-1)

    return model, prefill, decode


def measure(side: str, config: str, ids_file: str, kept: float) -> dict:
    torch.set_num_threads(2)
    ids = torch.tensor([json.load(open(ids_file))])
    model, prefill, decode = (run_obcache if side == "obcache" else run_kvpress)(config, ids, kept)
    loaded = rss_mib()
    times = []
    if config not in REPEATS:
        prefill()  # warm-up (counted in the peak, as every timed run is)
    for _ in range(REPEATS.get(config, 3)):
        start = time.perf_counter()
        cache, logits = prefill()
        times.append(time.perf_counter() - start)
    peak = rss_mib() - loaded
    nbytes = cache_bytes(cache)
    token = logits[:, -1:].argmax(-1)
    decode(cache, token, ids.shape[1])  # warm-up: the timed tokens then see a cache DECODE_TOKENS longer
    start = time.perf_counter()
    decode(cache, token, ids.shape[1] + DECODE_TOKENS)
    speed = DECODE_TOKENS / (time.perf_counter() - start)
    return {"side": side, "config": config, "prefill_s": statistics.median(times), "cache_bytes": nbytes,
            "peak_rss_mib": peak, "decode_tok_s": speed}


def context_ids(length: int) -> list[int]:
    import obcache
    from obcache.evaluation.tasks import make_sample

    tokenizer = obcache.load_tokenizer()
    sample = make_sample("niah_single_number", tokenizer, length, seed=0)
    return tokenizer(sample.context, add_special_tokens=False)["input_ids"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kvpress-python", help="the python of an environment with kvpress (see above)")
    parser.add_argument("--length", type=int, default=2048, help="context tokens")
    parser.add_argument("--kept", type=float, default=0.2, help="fraction of the context kept")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration, in alternating order")
    parser.add_argument("--out", default="runs/peer-kvpress.json")
    parser.add_argument("--side", choices=("obcache", "kvpress"), help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # one configuration, in its own process
        print(json.dumps(measure(args.side, args.config, args.ids, args.kept)))
        return 0
    if not args.kvpress_python:
        parser.error("--kvpress-python is required (kvpress needs its own environment, see the docstring)")
    ids_file = args.out + ".ids.json"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    json.dump(context_ids(args.length), open(ids_file, "w"))
    runs = []
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TRANSFORMERS_VERBOSITY": "error"}
    sides = [("obcache", sys.executable), ("kvpress", args.kvpress_python)]
    for round_ in range(args.rounds):  # each round in the other order: neither side always runs first
        for config in CONFIGS:
            for side, python in (sides if round_ % 2 == 0 else sides[::-1]):
                command = [python, __file__, "--side", side, "--config", config, "--ids", ids_file,
                           "--kept", str(args.kept)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode:
                    runs.append({"side": side, "config": config, "error": f"exit {done.returncode}"})
                else:
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]), flush=True)
    json.dump(runs, open(args.out, "w"), indent=1)
    print_table(combine(runs), args.length, args.kept, args.rounds)
    return 0


def combine(runs: list[dict]) -> list[dict]:
    """One row per (config, side): the median over rounds of its times and speeds, the largest peak."""
    rows = []
    for config in CONFIGS:
        for side in ("obcache", "kvpress"):
            ok = [r for r in runs if r["config"] == config and r["side"] == side and "error" not in r]
            if not ok:
                rows.append({"side": side, "config": config, "error": "every round failed"})
                continue
            rows.append({"side": side, "config": config, "cache_bytes": ok[0]["cache_bytes"],
                         "prefill_s": statistics.median(r["prefill_s"] for r in ok),
                         "decode_tok_s": statistics.median(r["decode_tok_s"] for r in ok),
                         "peak_rss_mib": max(r["peak_rss_mib"] for r in ok)})
    return rows


def print_table(rows: list[dict], length: int, kept: float, rounds: int) -> None:
    base = {row["side"]: row for row in rows if row["config"] == "none" and "error" not in row}
    print(f"\nSmolLM2-135M, float32, 2 threads, {length}-token context, {kept:.0%} kept, median of {rounds} rounds; "
          "ratios to the same library's plain prefill / full-cache decoding")
    print("| config | library | prefill + compression | K/V bytes held | peak RSS over the model | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        if "error" in row:
            print(f"| {row['config']} | {row['side']} | error: {row['error'][:60]} | | | |")
            continue
        plain = base.get(row["side"])
        ratio = lambda key: f" ({row[key] / plain[key]:.2f}x)" if plain else ""  # noqa: E731
        print(f"| {row['config']} | {row['side']} | {row['prefill_s']:.2f} s{ratio('prefill_s')} | "
              f"{row['cache_bytes'] / 2**20:.1f} MiB{ratio('cache_bytes')} | {row['peak_rss_mib']:.0f} MiB | "
              f"{row['decode_tok_s']:.1f}{ratio('decode_tok_s')} |")


if __name__ == "__main__":
    sys.exit(main())
