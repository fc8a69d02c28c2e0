#!/usr/bin/env python
"""Run the obcache benchmark suite (the same as `obcache bench`).

    flock /tmp/obcache-cpu.lock python benchmarks/run.py --lengths 2048 4096 8192 --out bench-cpu.json
    python benchmarks/run.py --device cuda --dtype bfloat16 --lengths 2048 4096 8192 --out bench-cuda.json

See obcache/bench/ for what is measured and how.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from obcache.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
