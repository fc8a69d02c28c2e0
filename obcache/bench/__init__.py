"""`obcache bench`: time, memory and cache size of eviction vs the full cache, side by side in one run.

For each context length, on one model:

- prefill without eviction vs with the uniform policy (default SnapKV +
  obc-joint, every KV head the same budget) and with the mode (the policy as
  given: by default AdaKV around it), end to end and the eviction inside it;
- eviction time of every policy x score (the hooks' `select` + `cache.keep`
  over all layers, from one recorded prefill) as a fraction of the prefill;
- scoring time per layer of every score kind vs `attention`;
- K/V cache bytes and slot-index bytes after eviction vs budget x full, kept
  tokens per head, and decode tokens/s vs the full cache (and under
  `obcache.attach`), for the uniform policy at each budget and for the mode;
- H2O full-history scoring of one layer: time and extra peak memory;
- peak memory of a plain prefill vs prefill + eviction (uniform, mode), each
  in a fresh process.

Modules: `cli` (arguments, the run), `measure` (timings), `memory` (the
peak-memory worker), `report` (targets, printed tables), `shapes` (models).
"""
