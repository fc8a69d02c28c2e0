"""Fused CPU kernels of the paged layout, compiled on first use with the system's C compiler, called through ctypes.

- `paged_decode(query, sets, heads, scaling)`: one decoding step over every block of a paged pool in a single
  call (`paged_decode.c`: each block's scores, merged into its segment's running softmax), where the torch
  formulation (`attention.decode_blocks`) takes about fifteen small kernels per layer;
- `append(...)`: a decoding step's new keys, values and positions written into their planned pool slots, and
  the lengths counted, in one call instead of five small kernels;
- `plan(...)`: the pool slots of the next appends, taking the blocks they need, in one call instead of
  some thirty small kernels.

Each returns None (or False) where it does not apply (not the CPU, not float32, not the index types and
contiguous tensors it reads, no compiler), and the caller uses its torch path: same numbers, to float
rounding. The library is built once per source and machine into `$OBCACHE_KERNEL_DIR` (default
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
    library.decode.argtypes = [pointer] * 5 + [count] * 6 + [ctypes.c_float, pointer]
    library.decode.restype = None
    library.append.argtypes = [pointer] * 8 + [count] * 5
    library.append.restype = None
    library.plan.argtypes = [pointer, count, pointer, pointer, pointer, count, pointer, count, count, count, pointer]
    library.plan.restype = count
    return library


def available() -> bool:
    return enabled() and _library() is not None


def paged_decode(query: torch.Tensor, sets, heads: int, scaling: float) -> torch.Tensor | None:
    """softmax(s q k^T) v of each segment over the slots of its blocks with a position >= 0, in every set
    (`layouts.Blocks`); query [B, Hq, 1, d] -> [B, 1, Hq, dv]; None where the kernel does not apply."""
    if query.device.type != "cpu" or query.dtype != torch.float32 or not enabled():
        return None
    if not all(_fits(blocks) for blocks in sets):
        return None
    library = _library()
    if library is None:
        return None
    batch, query_heads, _, dim = query.shape
    segments, group = batch * heads, query_heads // heads
    queries = query.reshape(segments, group, dim).contiguous()
    value_dim = sets[0].values.shape[-1]
    out = torch.empty(batch, 1, query_heads, value_dim, dtype=torch.float32)  # [S, G, dv] in the kernel
    if len(sets) == 1:
        blocks = sets[0]
        library.decode(queries.data_ptr(), blocks.keys.data_ptr(), blocks.values.data_ptr(),
                       blocks.positions.data_ptr(), blocks.route.data_ptr(), segments, blocks.keys.shape[0],
                       blocks.keys.shape[1], group, dim, value_dim, scaling, out.data_ptr())
        return out
    rows = segments * group
    state = torch.empty(2 * rows, dtype=torch.float32)  # each query's running max and sum
    top, total = state.data_ptr(), state.data_ptr() + 4 * rows
    library.start(rows, value_dim, top, total, out.data_ptr())
    for blocks in sets:
        library.accumulate(queries.data_ptr(), blocks.keys.data_ptr(), blocks.values.data_ptr(),
                           blocks.positions.data_ptr(), blocks.route.data_ptr(), blocks.keys.shape[0],
                           blocks.keys.shape[1], group, dim, value_dim, scaling, top, total, out.data_ptr())
    library.finish(rows, value_dim, total, out.data_ptr())
    return out


def _fits(blocks) -> bool:
    """Whether the kernel reads this block set as it is: float32, int32 positions, int64 route, contiguous."""
    return (blocks.keys.dtype == blocks.values.dtype == torch.float32 and blocks.positions.dtype == torch.int32
            and blocks.route.dtype == torch.int64 and all(t.is_contiguous() for t in blocks))


def _typed(*tensors: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every tensor is of `dtype` and contiguous (the kernels write through raw pointers)."""
    return all(t.dtype == dtype and t.is_contiguous() for t in tensors)


def append(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
           slots: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, new_positions: torch.Tensor) -> bool:
    """Write a decoding step's new rows [B, Hkv, 1, d] into the pool slots `slots` [S] of keys/values [N, block, d]
    and positions [N, block] (each row's from `new_positions` [B, 1] int32), lengths [S] += 1; False (nothing
    written) where the kernel does not apply."""
    if keys.dtype != torch.float32 or keys.device.type != "cpu" or new_keys.dtype != torch.float32 or not enabled():
        return False
    if not (_typed(positions, new_positions, dtype=torch.int32) and _typed(lengths, slots, dtype=torch.int64)
            and keys.is_contiguous() and values.is_contiguous() and new_positions.stride(-1) in (0, 1)):
        return False
    library = _library()
    if library is None:
        return False
    new_keys, new_values = new_keys.contiguous(), new_values.contiguous()
    library.append(keys.data_ptr(), values.data_ptr(), positions.data_ptr(), lengths.data_ptr(), slots.data_ptr(),
                   new_keys.data_ptr(), new_values.data_ptr(), new_positions.data_ptr(), new_positions.stride(0),
                   len(slots), new_keys.shape[1], keys.shape[-1], values.shape[-1])
    return True


def plan(table: torch.Tensor, owner: torch.Tensor, route: torch.Tensor, free: torch.Tensor, lengths: torch.Tensor,
         block: int, steps: int) -> tuple[torch.Tensor, int] | None:
    """The pool slots [steps, S] of every segment's next `steps` slots, and how many of the `free` block ids
    (taken from its end) are left, or minus how many it needs when too few (nothing changed then); blocks taken
    are written into `table` [S, width] (wide enough), `owner` and `route` [N]. None where the kernel does not
    apply. All int64, contiguous, on the CPU."""
    if table.device.type != "cpu" or not enabled() or not _typed(table, owner, route, free, lengths, dtype=torch.int64):
        return None
    library = _library()
    if library is None:
        return None
    out = torch.empty(steps, len(lengths), dtype=torch.int64)
    left = library.plan(table.data_ptr(), table.shape[1], owner.data_ptr(), route.data_ptr(), free.data_ptr(),
                        len(free), lengths.data_ptr(), len(lengths), block, steps, out.data_ptr())
    return out, left
