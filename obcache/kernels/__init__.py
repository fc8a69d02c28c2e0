"""Fused CPU kernels, compiled on first use with the system's C compiler and called through ctypes.

`paged_decode(query, sets, heads, scaling)`: one decoding step over every block of a paged pool in a single
call (`paged_decode.c`: each block's scores, merged into its segment's running softmax), where the torch
formulation (`attention.decode_blocks`) takes about fifteen small kernels per layer. It returns None where it
does not apply (not the CPU, not float32, no compiler), and the caller uses the torch path: same numbers, to
float rounding. The library is built once per source and machine into `$OBCACHE_KERNEL_DIR` (default
`~/.cache/obcache/kernels`); `OBCACHE_CPU_KERNEL=0` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("paged_decode.c")
FLAGS = (["-O3", "-march=native"], ["-O3"])  # the second where the compiler does not know -march=native


def enabled() -> bool:
    return os.environ.get("OBCACHE_CPU_KERNEL", "1") != "0"


@cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel (built now if this source and machine have none yet), or None with a warning."""
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = compiler.split()[0]
    if shutil.which(compiler) is None:
        warnings.warn(f"obcache: no C compiler ({compiler!r}) for the fused CPU decode kernel; using the torch "
                      f"path (slower on small batches)", stacklevel=3)
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + platform.machine().encode() + platform.node().encode()).hexdigest()[:16]
    folder = Path(os.environ.get("OBCACHE_KERNEL_DIR", Path.home() / ".cache" / "obcache" / "kernels"))
    target = folder / f"paged_decode-{key}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        errors = []
        for flags in FLAGS:
            with tempfile.NamedTemporaryFile(dir=folder, suffix=".so", delete=False) as built:
                pass
            result = subprocess.run([compiler, *flags, "-shared", "-fPIC", "-o", built.name, str(SOURCE), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built.name, target)  # atomic: processes building at once each leave a whole file
                break
            os.unlink(built.name)
            errors.append(result.stderr.strip().splitlines()[-1:] or ["?"])
        else:
            warnings.warn(f"obcache: the fused CPU decode kernel did not compile ({errors}); using the torch path",
                          stacklevel=3)
            return None
    library = ctypes.CDLL(str(target))
    pointer, count = ctypes.c_void_p, ctypes.c_int64
    library.accumulate.argtypes = [pointer] * 5 + [count] * 5 + [ctypes.c_float] + [pointer] * 3
    library.accumulate.restype = None
    library.start.argtypes = [count, count, pointer, pointer, pointer]
    library.finish.argtypes = [count, count, pointer, pointer]
    return library


def available() -> bool:
    return enabled() and _library() is not None


def paged_decode(query: torch.Tensor, sets, heads: int, scaling: float) -> torch.Tensor | None:
    """softmax(s q k^T) v of each segment over the slots of its blocks with a position >= 0, in every set
    (`layouts.Blocks`); query [B, Hq, 1, d] -> [B, 1, Hq, dv]; None where the kernel does not apply."""
    if query.device.type != "cpu" or query.dtype != torch.float32 or not enabled():
        return None
    if any(s.keys.dtype != torch.float32 or s.positions.dtype != torch.int32 for s in sets):
        return None
    library = _library()
    if library is None:
        return None
    batch, query_heads, _, dim = query.shape
    segments, group = batch * heads, query_heads // heads
    queries = query.reshape(segments, group, dim).contiguous()
    value_dim = sets[0].values.shape[-1]
    rows = segments * group
    state = torch.empty(rows * (value_dim + 2), dtype=torch.float32)  # top, total [S, G]; acc [S, G, dv]: `start`
    top, total, acc = state.data_ptr(), state.data_ptr() + 4 * rows, state.data_ptr() + 8 * rows
    library.start(rows, value_dim, top, total, acc)
    for blocks in sets:
        keys, values = blocks.keys.contiguous(), blocks.values.contiguous()
        positions, route = blocks.positions.contiguous(), blocks.route.to(torch.int64).contiguous()
        library.accumulate(queries.data_ptr(), keys.data_ptr(), values.data_ptr(), positions.data_ptr(),
                           route.data_ptr(), keys.shape[0], keys.shape[1], group, dim, value_dim, scaling,
                           top, total, acc)
    library.finish(rows, value_dim, total, acc)
    return state[2 * rows:].view(batch, 1, query_heads, value_dim)
