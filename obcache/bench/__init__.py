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

`obcache bench --decode` measures eviction during generation instead
(`obcache.Decoding`, default SnapKV + obc-joint, 512 tokens, every 16): a
2048-token generation after a 2048-token prompt; K/V bytes after it vs 512
tokens' worth; tokens/s over the last 512 steps vs a cache evicted once to 512
(at the same slots, without the eviction work) and vs the full cache at the
same length; the per-token overhead at intervals 1, 16 and 64. The other
benchmark flags (lengths, budgets, memory, ...) do not apply to it.

`obcache bench --reconstruction` times KVzip's query-agnostic compression
(`GlobalKV(KVzip(...))` at --score and --budget: the full context
reconstruction and the cheaper `source="prefill"` variant) against a plain
prefill, on needle contexts of --lengths (default 2048) tokens.

Modules: `cli` (arguments, the run), `measure` (timings), `decoding` (the
decode-time eviction run), `reconstruction` (KVzip's cost), `memory` (the
peak-memory worker), `report` (targets, printed tables), `shapes` (models).
"""
