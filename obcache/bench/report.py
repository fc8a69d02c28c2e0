"""The benchmark's targets (checked at the longest length) and its printed report.

A report is the JSON `obcache bench` writes: run metadata, `budget`, the keys
of the two policies compared (`uniform`: the plain policy, every head the same
budget; `mode`: the policy as given, e.g. AdaKV around it), and one entry per
context length (see `cli.bench_length`). `obcache bench --decode` writes the
run metadata and a `decoding` entry instead (see `decoding.measure_decoding`),
`obcache bench --reconstruction` a `reconstruction` entry (`reconstruction.measure_reconstruction`),
`obcache bench --layouts` a `layouts` entry (`layouts.measure_layouts`, with
its `scale` cell) and, with --decode, a `decoding` entry too.
"""

from __future__ import annotations

import operator

from obcache.bench.reconstruction import format_reconstruction

#: A small op this many times slower on all threads than on one means the CPU was shared (see `measure.oversubscription`).
SHARED_CPU = 3.0
#: target key -> (comparison, limit); ratios are "x", fractions "%".
TARGETS: dict[str, tuple[str, float]] = {
    "overhead": ("<=", 0.03), "joint_vs_attention": ("<=", 1.5), "full_history_memory": ("<", 0.10),
    "peak_memory": ("<=", 1.05), "cache_bytes": ("|x|<=", 0.01), "decode_speedup": (">=", 1.6),
    "mode_cache_bytes": ("|x|<=", 0.03), "mode_index_bytes": ("<", 0.02), "mode_peak_memory": ("<=", 1.0),
    "mode_decode_vs_full": (">=", 1.5), "mode_decode_vs_uniform": (">=", 0.97), "mode_overhead": ("<=", 0.03),
}
#: `bench --decode` (issue 19): decode speed over the timed tokens of the evicting cache (main interval) vs the
#: static cache of its budget at the same slots; the K/V bytes held (a paged layer's whole pool) must not grow once
#: the first `POOL_WARMUP_INTERVALS` intervals are past (the peak after them over the peak within them, - 1).
DECODE_TARGETS: dict[str, tuple[str, float]] = {"decode_vs_static": (">=", 0.95), "decode_pool_growth": ("<=", 0.0)}
#: Steps (in eviction intervals) after which decode-time eviction's pool must have stopped growing.
POOL_WARMUP_INTERVALS = 4
#: `bench --layouts` (issue 19), in every cell: the paged layout's decode tok/s vs the limit (a plain cache of the
#: kept length) and vs the uniform layout; its K/V bytes vs the kept tokens' bytes (- 1; the index apart); on the
#: 8B-shaped scale cell, its per-step time over the uniform layout's.
LAYOUT_TARGETS: dict[str, tuple[str, float]] = {
    "paged_vs_limit": (">=", 0.97), "paged_vs_uniform": (">=", 0.97), "paged_bytes": ("<=", 0.03),
    "scale_paged_vs_uniform": ("<=", 1.1),
}
#: `bench --reconstruction`: KVzip's compressing prefill / a plain prefill, full reconstruction and cheaper
#: (head-level) variant; other variants are printed without a target.
RECONSTRUCTION_TARGETS: dict[str, tuple[str, float]] = {"reconstruction_full": ("<=", 2.0), "reconstruction_cheap": ("<=", 1.3)}
_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, "|x|<=": lambda value, limit: abs(value) <= limit}
_OP_TEXT = {"<=": "<=", "<": "<", ">=": ">=", "|x|<=": "within +/-"}


def budget_key(budget: float | int) -> str:
    """The key of the uniform policy's cache at `budget` in a length entry's `caches` and `decode`."""
    return f"budget {budget}"


def eviction_fraction(row: dict, key: str) -> float:
    """Eviction of policy `key` (select + keep over all layers) as a fraction of the plain prefill."""
    return sum(row["eviction_seconds"][key].values()) / row["prefill_seconds"]


def _target(key: str, text: str, value: float, unit: str, also: bool = True, **where) -> dict:
    op, limit = {**TARGETS, **DECODE_TARGETS, **RECONSTRUCTION_TARGETS, **LAYOUT_TARGETS}[key]
    return {"key": key, "target": text, **where, "value": value, "op": op, "limit": limit, "unit": unit,
            "passed": bool(_OPS[op](value, limit) and also)}


def check_targets(report: dict) -> list[dict]:
    """The issue's targets: the prefill suite's at the longest length measured, then decode-time eviction's."""
    out = check_prefill_targets(report) if report.get("lengths") else []
    if "layouts" in report:
        out += check_layout_targets(report["layouts"])
    if "decoding" in report:
        out += check_decode_targets(report["decoding"])
    if "reconstruction" in report:
        out += check_reconstruction_targets(report["reconstruction"])
    return out


def check_reconstruction_targets(entry: dict) -> list[dict]:
    """KVzip at the longest length: the compressing prefill over the plain one, both variants."""
    row = max(entry["lengths"], key=lambda r: r["length"])
    plain = row["seconds"]["plain"]
    return [_target(f"reconstruction_{key}", f"{label}: compressing prefill / plain prefill", row["seconds"][key] / plain,
                    "x", tokens=row["length"]) for key, label in entry["policies"].items()
            if f"reconstruction_{key}" in RECONSTRUCTION_TARGETS]


def check_layout_targets(entry: dict) -> list[dict]:
    """Every cell of `bench --layouts`: paged vs the limit and vs uniform, its bytes; the scale cell's step time."""
    out = []
    for cell in entry["cells"]:
        tps, where = cell["tokens_per_second"], {"context": cell["context"], "batch": cell["batch"]}
        name = f"{cell['context']} tokens, batch {cell['batch']}"
        out.append(_target("paged_vs_limit", f"{name}: decode, paged / limit", tps["paged"] / tps["limit"], "x", **where))
        out.append(_target("paged_vs_uniform", f"{name}: decode, paged / uniform", tps["paged"] / tps["uniform"], "x",
                           **where))
        out.append(_target("paged_bytes", f"{name}: paged K/V bytes / kept tokens' bytes - 1",
                           cell["bytes"]["paged"]["bytes_error"], "%", **where))
    scale = entry.get("scale")
    if scale:
        name = f"scale ({scale['shape_name']}, {scale['context']} tokens, batch {scale['batch']})"
        where = {"context": scale["context"], "batch": scale["batch"], "scale": True}
        steps = scale["step_seconds"]
        out.append(_target("scale_paged_vs_uniform", f"{name}: step time, paged / uniform",
                           steps["paged"] / steps["uniform"], "x", **where))
        out.append(_target("paged_bytes", f"{name}: paged K/V bytes / kept tokens' bytes - 1",
                           scale["bytes"]["paged"]["bytes_error"], "%", **where))
    return out


def pool_summary(entry: dict) -> dict:
    """Decode-time eviction's K/V bytes and pool blocks: after the prompt, the peak within the first
    `POOL_WARMUP_INTERVALS` intervals, the peak after them, at the end; the growth after them (peak after / peak
    within - 1) and the last step at which the bytes held reached a new peak."""
    pool, warm = entry["generation"]["pool"], POOL_WARMUP_INTERVALS * entry["interval"]
    held, blocks = pool["bytes"], pool["blocks"]  # index 0: after the prompt; i: after step i
    early, late = held[: warm + 1], held[warm + 1:]
    last, peak = 0, held[0]
    for step, value in enumerate(held):
        if value > peak:
            last, peak = step, value
    return {
        "warmup_steps": warm, "steps": len(held) - 1, "bytes_start": held[0], "bytes_warm": max(early),
        "bytes_after": max(late) if late else None, "bytes_end": held[-1], "growth": max(late) / max(early) - 1 if late else 0.0,
        "last_growth_step": last, "blocks_start": blocks[0], "blocks_warm": max(blocks[: warm + 1]),
        "blocks_max": max(blocks), "blocks_end": blocks[-1],
    }


def check_decode_targets(entry: dict) -> list[dict]:
    """Decode-time eviction at the main interval: tokens/s vs the static cache of its budget; the pool's growth."""
    decode, interval = entry["decode"], entry["interval"]
    mine = decode[f"evicting {interval}"]["tokens_per_second"]
    where = {"tokens": entry["new_tokens"]}
    name = f"{entry['policy']} evicting to {entry['budget']} every {interval}"
    pool = pool_summary(entry)
    return [
        _target("decode_vs_static", f"{name}: decode, last {entry['timed']} tokens / static {entry['budget']} cache",
                mine / decode[f"static {interval}"]["tokens_per_second"], "x", **where),
        _target("decode_pool_growth", f"{name}: peak K/V bytes held over steps {pool['warmup_steps'] + 1}-"
                f"{pool['steps']} / peak over the prompt and steps 1-{pool['warmup_steps']}, - 1", pool["growth"],
                "%", **where),
    ]


def check_prefill_targets(report: dict) -> list[dict]:
    """The prefill suite's targets, evaluated at the longest length measured."""
    row = max(report["lengths"], key=lambda r: r["length"])
    uniform, mode, kv_heads = report["uniform"], report["mode"], report["kv_heads"]
    caches, decode = row["caches"], row["decode"]
    out: list[dict] = []

    def add(key: str, text: str, value: float, unit: str, also: bool = True) -> None:
        out.append(_target(key, text, value, unit, also, length=row["length"]))

    add("overhead", f"{uniform} eviction / prefill", eviction_fraction(row, uniform), "%")
    scoring = row["scoring_seconds"]
    add("joint_vs_attention", "obc-joint scoring / attention scoring", scoring["obc-joint"] / scoring["attention"], "x")
    for entry in row.get("full_history", []):
        add("full_history_memory", f"H2O full-history ({entry['score']}) extra peak / KV cache",
            entry["extra_peak_bytes"] / entry["cache_bytes"], "%", entry["extra_peak_bytes"] < entry["l_by_l_bytes"])
    memory = row.get("memory")
    if memory:
        plain = memory["plain"]["peak_bytes"]
        for key, role, name in (("peak_memory", "uniform", uniform), ("mode_peak_memory", "mode", mode)):
            add(key, f"peak memory, prefill + {name} eviction / plain prefill", memory[role]["peak_bytes"] / plain, "x")
    for key, entry in caches.items():
        if key.startswith("budget "):
            add("cache_bytes", f"cache bytes error at {key}, {kv_heads} KV heads kept", entry["bytes_error"], "%",
                entry["kv_heads"] == kv_heads)
    mine, same = caches["mode"], budget_key(report["budget"])
    add("mode_cache_bytes", f"{mode} cache bytes error at budget {report['budget']}", mine["bytes_error"], "%",
        mine["kv_heads"] == kv_heads)
    add("mode_index_bytes", f"{mode} slot index bytes / K/V bytes", mine["index_bytes"] / mine["cache_bytes"], "%")
    add("decode_speedup", f"decode, {uniform} at {same} / full cache", decode[same] / decode["full"], "x")
    add("mode_decode_vs_full", f"decode, {mode} / full cache", decode["mode"] / decode["full"], "x")
    add("mode_decode_vs_uniform", f"decode, {mode} / {uniform} at {same}", decode["mode"] / decode[same], "x")
    add("mode_overhead", f"{mode} eviction / prefill", eviction_fraction(row, "mode"), "%")
    return out


def _mb(n: float | None) -> str:
    return f"{n / 2**20:.1f}" if n is not None else "-"


def _value(value: float, unit: str) -> str:
    return f"{value:.2%}" if unit == "%" else f"{value:.3f}x"


def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]


def _x(part: float, whole: float, digits: int = 2) -> str:
    """part / whole as a ratio: "1.23x"."""
    return f"{part / whole:.{digits}f}x"


def _over_lengths(report: dict) -> list[tuple[str, list[str]]]:
    """The rows of the main table: one column per context length."""
    lengths, uniform, mode = report["lengths"], report["uniform"], report["mode"]
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, cell) -> None:
        rows.append((label, [cell(r) for r in lengths]))

    add("prefill, no eviction (s)", lambda r: f"{r['prefill_seconds']:.2f}")
    for key, name in (("uniform", uniform), ("mode", mode)):
        add(f"prefill + {name} eviction (s, x plain)",
            lambda r, k=key: f"{r['hooked'][k]['seconds']:.2f} ({_x(r['hooked'][k]['seconds'], r['prefill_seconds'], 3)})")
        add("  eviction inside that prefill (s, % of plain)", lambda r, k=key: (
            f"{r['hooked'][k]['eviction_seconds']:.3f} ({r['hooked'][k]['eviction_seconds'] / r['prefill_seconds']:.2%})"))
    for key in lengths[0]["eviction_seconds"]:
        add(f"eviction {mode if key == 'mode' else key}: select + keep (% of prefill)",
            lambda r, k=key: f"{eviction_fraction(r, k):.2%}")
    for key in lengths[0]["scoring_seconds"]:
        add(f"scoring/layer {key} (ms, x attention)", lambda r, k=key: (
            f"{r['scoring_seconds'][k] * 1e3:.2f} ({_x(r['scoring_seconds'][k], r['scoring_seconds']['attention'])})"))
    add("decode full cache, model's own attention (tok/s)", lambda r: f"{r['decode']['full']:.1f}")
    add("decode full cache under obcache.attach (tok/s)", lambda r: f"{r['decode']['full attached']:.1f}")
    for key in lengths[0]["caches"]:
        if key == "full":
            continue
        name = f"{uniform} {key}" if key != "mode" else f"{mode} budget {report['budget']}"
        add(f"decode {name} (tok/s, x full)",
            lambda r, k=key: f"{r['decode'][k]:.1f} ({_x(r['decode'][k], r['decode']['full'])})")
        add(f"  cache MiB at {name}: kept / budget x full (error), kept shape or min-max per head", lambda r, k=key: (
            f"{_mb(r['caches'][k]['cache_bytes'])} / {_mb(r['caches'][k]['expected_bytes'])} "
            f"({r['caches'][k]['bytes_error']:+.2%}) {r['caches'][k]['kept_shape'] or r['caches'][k]['head_tokens']}"))
    for i, entry in enumerate(lengths[0].get("full_history", [])):
        add(f"H2O full-history {entry['score']}, 1 layer: s, extra peak MiB (% of KV cache; L x L would be)",
            lambda r, i=i: _full_history(r["full_history"][i]))
    if "memory" in lengths[0]:
        what = "GPU max allocated" if report["device"].startswith("cuda") else "peak RSS"
        add(f"{what} after model load (MiB)", lambda r: _mb(r["memory"]["plain"]["baseline_bytes"]))
        add(f"{what} plain prefill (MiB)", lambda r: _mb(r["memory"]["plain"]["peak_bytes"]))
        for key, name in (("uniform", uniform), ("mode", mode)):
            add(f"{what} prefill + {name} eviction (MiB, x plain)", lambda r, k=key: (
                f"{_mb(r['memory'][k]['peak_bytes'])} ({_x(r['memory'][k]['peak_bytes'], r['memory']['plain']['peak_bytes'], 3)})"))
    return rows


def _full_history(entry: dict) -> str:
    extra = entry["extra_peak_bytes"]
    return f"{entry['seconds']:.2f} s, {_mb(extra)} ({extra / entry['cache_bytes']:.1%}; {_mb(entry['l_by_l_bytes'])})"


def _side_by_side(report: dict, row: dict) -> list[str]:
    """Full cache | uniform policy | mode at the same budget, for one context length."""
    same = budget_key(report["budget"])
    caches, decode, prefill = row["caches"], row["decode"], row["prefill_seconds"]
    columns = [("full", None), (same, "uniform"), ("mode", "mode")]  # (cache key, role)
    evictions = {"uniform": report["uniform"], "mode": "mode"}
    full_bytes = caches["full"]["cache_bytes"]

    def cells(fn) -> list[str]:
        return [fn(caches[key], decode[key], role) for key, role in columns]

    rows = [
        ("K/V cache MiB (x full)", cells(lambda c, _, __: f"{_mb(c['cache_bytes'])} ({_x(c['cache_bytes'], full_bytes, 3)})")),
        ("slot index KiB (% of K/V)",
         cells(lambda c, _, __: f"{c['index_bytes'] / 1024:.1f} ({c['index_bytes'] / c['cache_bytes']:.2%})")),
        ("layout, kept tokens per KV head (min-max)",
         cells(lambda c, _, __: f"{c['layout']}, {'-'.join(map(str, c['head_tokens']))}")),
        ("decode tok/s (x full, x uniform)",
         cells(lambda _, d, __: f"{d:.1f} ({_x(d, decode['full'])}, {_x(d, decode[same])})")),
        ("eviction select + keep (% of prefill)",
         cells(lambda _, __, p: "-" if p is None else f"{eviction_fraction(row, evictions[p]):.2%}")),
        ("eviction inside a hooked prefill (% of prefill)",
         cells(lambda _, __, p: "-" if p is None else f"{row['hooked'][p]['eviction_seconds'] / prefill:.2%}")),
    ]
    if "memory" in row:
        peaks = {role: worker["peak_bytes"] for role, worker in row["memory"].items()}
        rows.append(("peak RSS / GPU memory of the prefill, MiB (x plain)", cells(
            lambda _, __, p: f"{_mb(peaks[p or 'plain'])} ({_x(peaks[p or 'plain'], peaks['plain'], 3)})")))
    title = f"{row['length']} tokens, budget {report['budget']}: side by side"
    return [title, "", *_table(["measure", "full cache", report["uniform"], report["mode"]], rows)]


def _decoding(entry: dict) -> list[str]:
    """The decode-time eviction section: evicting | static | full side by side, the interval sweep, the generation."""
    decode, budget, interval, timed = entry["decode"], entry["budget"], entry["interval"], entry["timed"]
    generation, token_bytes = entry["generation"], entry["generation"]["token_bytes"]
    columns = [f"evicting {interval}", f"static {interval}", "full"]
    tps = {key: decode[key]["tokens_per_second"] for key in decode}
    static = tps[f"static {interval}"]

    def cells(fn) -> list[str]:
        return [fn(key, decode[key]) for key in columns]

    def hooks_ms(key: str, d: dict) -> str:
        return "-" if key.startswith("full") else f"{d['eviction_seconds'] / timed * 1e3:.2f}"

    rows = [
        (f"decode tok/s, last {timed} tokens (x static, x full)",
         cells(lambda k, _: f"{tps[k]:.1f} ({_x(tps[k], static)}, {_x(tps[k], tps['full'])})")),
        ("ms per token (+ vs static)", cells(lambda k, _: f"{1e3 / tps[k]:.1f} ({1e3 / tps[k] - 1e3 / static:+.1f})")),
        ("median / slowest step, ms", cells(
            lambda _, d: f"{d['median_step_seconds'] * 1e3:.1f} / {d['max_step_seconds'] * 1e3:.1f}")),
        ("slots per KV head before each timed step (min-max)", cells(lambda _, d: "-".join(f"{n:g}" for n in d["slots"]))),
        (f"K/V cache MiB after the last step (x {budget} tokens)", cells(
            lambda _, d: f"{_mb(d['cache_bytes'])} ({_x(d['cache_bytes'], budget * token_bytes, 3)})")),
        ("eviction inside the hooks, ms per token", cells(hooks_ms)),
    ]
    sweep = []
    for k in entry["intervals"]:
        mine, same = tps[f"evicting {k}"], tps[f"static {k}"]
        sweep.append((str(k), [
            f"{1e3 / mine:.1f}", f"{1e3 / same:.1f}", f"{1e3 / mine - 1e3 / same:+.2f} ({_x(same, mine)})",
            hooks_ms("", decode[f"evicting {k}"]), "-".join(f"{n:g}" for n in decode[f"evicting {k}"]["slots"])]))
    steps = generation["step_seconds"]
    new, last = len(steps), steps[-timed:]
    most = max(generation["slots"])
    title = (f"decode-time eviction: {entry['policy']}, budget {budget} tokens per KV head, interval {interval}; "
             f"{entry['context']}-token prompt evicted to {budget}, {new} tokens generated, the last {timed} timed "
             f"(best of {entry['rounds']} rounds; static: evicted once, never again, reset every `interval` tokens "
             "untimed; full: the model's own cache at the same length)")
    return [
        title, "",
        *_table(["measure", f"evicting every {interval}", f"static {budget} cache", "full cache"], rows), "",
        f"eviction interval sweep (last {timed} tokens; static: the same slots, no eviction)", "",
        *_table(["interval", "ms per token, evicting", "ms per token, static", "overhead per token, ms (x static)",
                 "eviction inside the hooks, ms per token", "slots per KV head (min-max)"], sweep), "",
        f"generation: {new} tokens in {sum(steps):.1f} s ({new / sum(steps):.1f} tok/s; last {timed}: "
        f"{timed / sum(last):.1f} tok/s) after a {generation['prefill_seconds']:.2f} s prefill; cache after it "
        f"{_mb(generation['cache_bytes'])} MiB = {generation['cache_bytes'] / token_bytes:g} tokens' worth "
        f"({generation['bytes_error']:+.2%} vs {budget}), between steps at most {most:g} slots per KV head "
        f"({most / budget - 1:+.2%}); eviction inside the hooks {generation['decode_eviction_seconds']:.2f} s "
        f"({generation['decode_eviction_seconds'] / new * 1e3:.2f} ms per token)",
        "", _pool_line(entry),
    ]


def _pool_line(entry: dict) -> str:
    """What decode-time eviction's cache held over the generation: bytes and (paged) pool blocks."""
    pool, token_bytes = pool_summary(entry), entry["generation"]["token_bytes"]
    warm, layout = pool["warmup_steps"], entry["generation"].get("layout", "uniform")
    worth = lambda n: f"{_mb(n)} MiB = {n / token_bytes:.0f} tokens' worth"  # noqa: E731
    blocks = (f"pool blocks (all layers): {pool['blocks_start']} after the prompt, {pool['blocks_warm']} at most over "
              f"steps 1-{warm}, {pool['blocks_max']} at most over all {pool['steps']} steps, {pool['blocks_end']} "
              "at the end; " if layout == "paged" else "uniform layout (no pool); ")
    after = "-" if pool["bytes_after"] is None else worth(pool["bytes_after"])
    return (f"{layout} layout, K/V bytes held: {blocks}K/V bytes {worth(pool['bytes_start'])} after the prompt, "
            f"peak {worth(pool['bytes_warm'])} over steps 1-{warm}, peak {after} over steps {warm + 1}-{pool['steps']} "
            f"({pool['growth']:+.2%}), {worth(pool['bytes_end'])} at the end; last new peak at step "
            f"{pool['last_growth_step']}")


def _ratio(part: float, whole: float) -> str:
    return f"{part / whole:.3f}x"


def _layouts(report: dict) -> list[str]:
    """`bench --layouts`: decode speed per cell against the limit, the bytes held, the scale cell."""
    entry = report["layouts"]
    policies, cells = entry["policies"], entry["cells"]
    header = (f"layouts vs the limit: decode tok/s over all rows (batch x steps / s), median of {entry['rounds']} "
              f"interleaved rounds of {entry['steps']} steps after a warm-up step, {report['machine']['torch_threads']} "
              f"torch threads; kept {entry['budget']}: limit = the model's own DynamicCache holding only the kept "
              f"tokens; uniform = {policies['uniform']}; paged = {policies['paged']}")
    speed = []
    for cell in cells:
        tps = cell["tokens_per_second"]
        speed.append((f"{cell['context']}, {cell['batch']}", [
            f"{tps['full']:.1f}" if "full" in tps else "-", f"{tps['limit']:.1f} ({cell['kept']})",
            f"{tps['uniform']:.1f} ({_ratio(tps['uniform'], tps['limit'])})",
            f"{tps['paged']:.1f} ({_ratio(tps['paged'], tps['limit'])})", _ratio(tps["paged"], tps["uniform"]),
            " / ".join(f"{min(cell['rounds'][k]):.1f}-{max(cell['rounds'][k]):.1f}" for k in ("limit", "uniform", "paged")),
        ]))
    lines = [header, "", *_table(["context, batch", "full", "limit (kept tokens)", "uniform (x limit)",
                                  "paged (x limit)", "paged / uniform", "rounds min-max: limit / uniform / paged"],
                                 speed)]
    lines += ["", "bytes held right after eviction (cache.kv_nbytes(), cache.index_nbytes()) vs the kept tokens' bytes "
              "(the real slots of every KV head, keys and values)", ""]
    rows = []
    for cell in [*cells, *([entry["scale"]] if entry.get("scale") else [])]:
        uniform, paged = cell["bytes"]["uniform"], cell["bytes"]["paged"]
        label = f"{cell['context']}, {cell['batch']}" + (" (scale)" if "shape" in cell else "")
        rows.append((label, [
            f"{_mb(uniform['cache_bytes'])} / {_mb(uniform['kept_bytes'])} ({uniform['bytes_error']:+.2%})",
            f"{_mb(paged['cache_bytes'])} / {_mb(paged['kept_bytes'])} ({paged['bytes_error']:+.2%})",
            f"{'-'.join(map(str, paged['head_tokens']))} (mean {paged['mean_tokens']:.0f}), "
            f"block {'/'.join(map(str, paged['block_sizes']))}",
            f"{uniform['index_bytes'] / 1024:.1f} ({uniform['index_bytes'] / uniform['cache_bytes']:.2%})",
            f"{paged['index_bytes'] / 1024:.1f} ({paged['index_bytes'] / paged['cache_bytes']:.2%})",
        ]))
    lines += _table(["context, batch", "uniform: MiB held / kept (error)", "paged: MiB held / kept (error)",
                     "paged tokens per KV head (min-max), block size", "uniform index KiB (% of K/V)",
                     "paged index KiB (% of K/V)"], rows)
    scale = entry.get("scale")
    if scale:
        shape, steps = scale["shape"], scale["step_seconds"]
        lines += ["", f"scale: random weights, {scale['shape_name']} ({shape['layers']} layers, {shape['query_heads']} "
                  f"query and {shape['kv_heads']} KV heads of {shape['head_dim']} dims, hidden size "
                  f"{shape['hidden_size']}, {shape['dtype']}), pseudo-random prompt; ms per decoding step (all rows), "
                  f"median of {entry['rounds']} interleaved rounds", "",
                  *_table(["context, batch", "limit (kept tokens)", "uniform", "paged", "paged / uniform"], [(
                      f"{scale['context']}, {scale['batch']}", [
                          f"{steps['limit'] * 1e3:.1f} ({scale['kept']})", f"{steps['uniform'] * 1e3:.1f}",
                          f"{steps['paged'] * 1e3:.1f}", _ratio(steps["paged"], steps["uniform"])])])]
    return lines


def _targets(title: str, targets: list[dict]) -> list[str]:
    lines = ["", title]
    for t in targets:
        lines.append(f"  [{'PASS' if t['passed'] else 'MISS'}] {t['target']}: {_value(t['value'], t['unit'])} "
                     f"(target {_OP_TEXT[t['op']]} {_value(t['limit'], t['unit'])})")
    return lines


def format_report(report: dict) -> str:
    """The printed report: the table over lengths, the side-by-side comparison per length, the decode-time
    eviction section (each when measured), the targets."""
    lines = [f"model {report['model']}, device {report['device']}, dtype {report['dtype']}, attn {report['attn']}, "
             f"torch threads {report['machine']['torch_threads']}", ""]
    slowdowns = [x for x in report["machine"].get("oversubscription", []) if x is not None]
    if slowdowns and max(slowdowns) > SHARED_CPU:
        ratios = " / ".join(f"{x:.0f}x" for x in slowdowns)
        lines += [f"WARNING: other processes held the CPU: a small op ran {ratios} slower on all threads than on one "
                  "(start / end); times of small ops (eviction, decode) are inflated.", ""]
    if report.get("lengths"):
        lines += _table(["measure", *(str(r["length"]) for r in report["lengths"])], _over_lengths(report))
        for row in report["lengths"]:
            lines += ["", *_side_by_side(report, row)]
    if "layouts" in report:
        lines += _layouts(report)
    if "decoding" in report:
        lines += ([""] if report.get("lengths") or "layouts" in report else []) + _decoding(report["decoding"])
    if "reconstruction" in report:
        lines += format_reconstruction(report["reconstruction"])
    prefill = [t for t in report["targets"] if t["key"] in TARGETS]
    decode = [t for t in report["targets"] if t["key"] in DECODE_TARGETS]
    reconstruction = [t for t in report["targets"] if t["key"] in RECONSTRUCTION_TARGETS]
    layouts = [t for t in report["targets"] if t["key"] in LAYOUT_TARGETS]
    if prefill:
        lines += _targets("targets (at the longest length):", prefill)
    if layouts:
        lines += _targets("targets (layouts vs the limit, every cell):", layouts)
    if decode:
        lines += _targets("targets (decode-time eviction):", decode)
    if reconstruction:
        lines += _targets("targets (context reconstruction, at the longest length):", reconstruction)
    return "\n".join(lines)
