"""The layouts of one cache layer: uniform (every KV head holds as many slots), paged (any number), mixed
(kept tokens at several widths, `mixed.py`); `base.py` holds what they share.

Both are written in place: storage is preallocated and a new token is copied
into the next free slot, never concatenated. Both record, per slot, the
position of its token in the row as fed (left padding included; -1 marks a
padding or empty slot), so masks, kept positions and later evictions never
depend on where a slot sits.

- `UniformLayer`: keys/values [B, Hkv, C, d] with room for C >= n slots, n used;
  attention goes to the model's own sdpa/eager kernel over the first n.
- `PagedLayer`: a pool of fixed-size blocks [N, block, d]; each (row, KV head)
  segment owns the blocks its block table lists, in order. Eviction compacts
  each segment's kept slots into its first blocks and frees the others, which
  later appends reuse: the pool does not grow under decode-time eviction.
  Built by eviction with an exact pool; its block size (a power of two, 4 to
  128, about 5% of the mean kept length) keeps the partly filled last blocks
  under ~2.5% of the bytes.

Both give a policy one view, `grid()`: keys, values, validity and positions
[B, Hkv, W] with every segment right-aligned (its last slots share the last
columns), and take the keep mask back in that grid (`keep`). Per-slot riders
(`rider`/`set_rider`: a policy's running scores) follow the slots through
`keep` and start at 0 for appended ones; `policy_state` is a policy's own
per-layer state, carried as is. A `fork` shares the storage until either side
writes (copy on write).
"""

from obcache.layouts.base import Grid, Layer
from obcache.layouts.mixed import MixedLayer, PackedStore
from obcache.layouts.paged import Blocks, FloatStore, PagedLayer, block_size
from obcache.layouts.uniform import UniformLayer

__all__ = ["Blocks", "FloatStore", "Grid", "Layer", "MixedLayer", "PackedStore", "PagedLayer", "UniformLayer",
           "block_size"]
