"""Peak memory of one prefill, measured in a fresh process (the memory worker).

The worker (`python -m obcache.bench.memory CONFIG_JSON`) loads the model, runs
one 16-token forward so every weight is resident, resets the high-water mark,
then runs one prefill, plain or under a policy's hooks, and prints one JSON
line. CPU: VmHWM from /proc/self/status, reset through /proc/self/clear_refs;
CUDA: `max_memory_allocated` after `reset_peak_memory_stats`.

CONFIG_JSON: length, model, random_weights, attn, dtype, device, threads, and
`policy`: None (plain prefill) or the keyword arguments of
`obcache.policies.build_policy`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from obcache.bench.measure import timed
from obcache.bench.shapes import forward, load_benchmark_model, prompt
from obcache.cache import EvictableCache
from obcache.policies import build_policy


def _read_status(field: str) -> int:
    """A /proc/self/status field, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@torch.no_grad()
def memory_worker(config: dict) -> dict:
    """One prefill (plain, or evicting with `config["policy"]`) in this process; its peak memory and cache."""
    torch.set_num_threads(config["threads"])
    model = load_benchmark_model(config["model"], config["random_weights"], config["attn"], config["dtype"], config["device"])
    device = model.device
    ids = prompt(config["length"], model.config.vocab_size, device)
    policy = build_policy(**config["policy"]) if config["policy"] is not None else None
    result: dict = {"length": config["length"], "policy": config["policy"]}
    forward(model, EvictableCache(), ids[:, :16])  # touch every weight: the baseline counts the resident model
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
    cache = EvictableCache()
    with policy.attach(model) if policy is not None else nullcontext():
        result["prefill_seconds"] = timed(lambda: forward(model, cache, ids), device)[1]
    result["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _read_status("VmHWM")
    result["cache_bytes"], result["index_bytes"] = cache.kv_nbytes(), cache.index_nbytes()
    result["eviction_seconds"] = cache.eviction_seconds
    return result


def run_memory_worker(config: dict) -> dict:
    """`memory_worker(config)` in a fresh Python process."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "obcache.bench.memory", json.dumps(config)],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(memory_worker(json.loads(sys.argv[1]))))
