#!/usr/bin/env python
"""One decoding step of attention over a paged pool, three ways, side by side (issue 19): the fused CPU kernel
(`obcache.kernels.paged_decode`), the batched torch computation (`attention.decode_blocks`), and SDPA over a
uniform cache of the same mean length (what the uniform layout runs). Shapes of SmolLM2 (3 KV heads, G = 3,
d = 64) at 2k/8k and 10% kept, and of an 8B-shaped attention (8 KV heads, G = 4, d = 128), random data;
microseconds per call (median of repeats), and the largest difference from a float64 reference:

    flock /tmp/obcache-cpu.lock python benchmarks/paged_kernel.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from obcache import kernels  # noqa: E402
from obcache.attention import decode_blocks  # noqa: E402
from obcache.layouts import Blocks  # noqa: E402

#: (rows, KV heads, G, tokens per head, block, head dim)
SHAPES = [(1, 3, 3, 210, 8, 64), (4, 3, 3, 210, 8, 64), (1, 3, 3, 825, 32, 64), (8, 3, 3, 825, 32, 64),
          (8, 8, 4, 819, 32, 128)]


def timed(call, repeats: int) -> float:
    for _ in range(5):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    print(f"torch threads {args.threads}; fused kernel available: {kernels.available()}")
    print("| rows x KV heads, G, tokens per head, block, d | fused kernel, us | torch blocks, us | uniform SDPA, us "
          "| fused max error | torch max error |")
    print("|---|---|---|---|---|---|")
    for rows, heads, group, tokens, block, dim in SHAPES:
        segments, per = rows * heads, -(-tokens // block)
        count = segments * (per + 1)  # each segment's blocks, and one taken ahead of appends
        route = torch.arange(segments).repeat_interleave(per + 1)[torch.randperm(count, generator=generator)]
        positions = torch.arange(count * block, dtype=torch.int32).view(count, block)
        positions[torch.rand(count, block, generator=generator) < 1 - tokens / ((per + 1) * block)] = -1
        keys, values = torch.randn(count, block, dim, generator=generator), torch.randn(count, block, dim, generator=generator)
        query = torch.randn(rows, heads * group, 1, dim, generator=generator)
        sets, scale = [Blocks(keys, values, positions, route)], dim ** -0.5
        z = torch.einsum("sgd,npd->sgnp", query.reshape(segments, group, dim).double(), keys.double()) * scale
        hidden = (route[None, :] != torch.arange(segments)[:, None])[:, None, :, None] | (positions < 0)[None, None]
        reference = torch.einsum("sgm,md->sgd", z.masked_fill(hidden, float("-inf")).flatten(2).softmax(-1),
                                 values.double().reshape(-1, dim)).reshape(rows, 1, heads * group, dim)
        fused = kernels.paged_decode(query, sets, heads, scale)
        uniform_keys = torch.randn(rows, heads, tokens, dim, generator=generator)
        cells = [timed(lambda: kernels.paged_decode(query, sets, heads, scale), args.repeats) if fused is not None
                 else float("nan"),
                 timed(lambda: decode_blocks(query, sets, heads, scale), args.repeats),
                 timed(lambda: F.scaled_dot_product_attention(query, uniform_keys, uniform_keys, scale=scale,
                                                              enable_gqa=True), args.repeats)]
        errors = [float((out.double() - reference).abs().max()) if out is not None else float("nan")
                  for out in (fused, decode_blocks(query, sets, heads, scale))]
        print(f"| {rows} x {heads}, {group}, {tokens}, {block}, {dim} | {cells[0]:.0f} | {cells[1]:.0f} | "
              f"{cells[2]:.0f} | {errors[0]:.1e} | {errors[1]:.1e} |")


if __name__ == "__main__":
    main()
