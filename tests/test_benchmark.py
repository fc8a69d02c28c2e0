"""The benchmark's command line (the measurements themselves run in `obcache bench`, not in tests)."""

import argparse

from obcache.benchmark import DEFAULT_LENGTHS, register


def test_register_adds_bench_with_gpu_options():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    register(commands)
    args = parser.parse_args(["bench", "--device", "cuda", "--dtype", "bfloat16", "--lengths", "2048", "4096", "--out", "x.json"])
    assert (args.device, args.dtype, args.lengths, args.out) == ("cuda", "bfloat16", [2048, 4096], "x.json")
    assert callable(args.run)
    assert parser.parse_args(["bench"]).lengths == list(DEFAULT_LENGTHS)
