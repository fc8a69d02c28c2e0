"""A batched row is the row alone: the same kept positions and the same tokens, whatever the left padding.

A property test over every selection mode, allocation and policy. The model
runs in float64, so that the only way a row can differ from itself alone is a
real difference in what the selection sees (padding slots counted, spans cut
on the padded grid, budgets sized from the longest row, ...), not rounding:
equality is exact.
"""

from __future__ import annotations

import pytest
import torch

import obcache
from obcache import (
    H2O, TOVA, AdaKV, Decoding, GlobalKV, KVzipHeads, MixedPrecision, PyramidKV, Quantized, SnapKV, StreamingLLM,
)
from obcache.layouts import MixedLayer
from tests.conftest import tiny_model

STEPS = 10
CHUNK = 4

MODES = {
    "per-head": lambda budget: SnapKV(budget=budget, window=4, kernel=3, score="obc-key"),
    "per-head-tova": lambda budget: TOVA(budget=budget, score="obc-joint"),
    "per-head-h2o": lambda budget: H2O(budget=budget, window=3, score="obc-value", full_history=True),
    "streaming": lambda budget: StreamingLLM(budget=budget, sinks=2),
    "chunk": lambda budget: SnapKV(budget=budget, window=4, kernel=3, score="obc-key", chunk=CHUNK, sinks=2),
    "shared-normalized-mean": lambda budget: SnapKV(budget=budget, window=4, kernel=5, score="attention",
                                                    selection="shared"),
    "shared-mean": lambda budget: SnapKV(budget=budget, window=4, kernel=5, pooling="avg", score="obc-joint",
                                         selection="shared", combine="mean"),
    "shared-max": lambda budget: H2O(budget=budget, window=3, score="obc-key", selection="shared", combine="max",
                                     chunk=CHUNK),
    "pyramid": lambda budget: PyramidKV(SnapKV(budget=budget, window=3, kernel=3, score="obc-key"), beta=4),
    "adakv": lambda budget: AdaKV(SnapKV(budget=budget, window=3, kernel=5, score="obc-key", chunk=CHUNK), alpha=0.3),
    "adakv+pyramid": lambda budget: AdaKV(PyramidKV(H2O(budget=budget, window=3, score="attention"), beta=3)),
    "global": lambda budget: GlobalKV(SnapKV(budget=budget, window=3, kernel=3, score="obc-joint"), alpha=0.2),
    "kvzip-heads": lambda budget: KVzipHeads(budget=budget, sinks=2, score="attention",
                                             ratings=torch.tensor([[1.0, 3.0], [2.0, 0.5]])),
    "recommended": lambda budget: obcache.recommended(budget=budget, window=4, kernel=3, chunk=CHUNK),
    "decoding-h2o": lambda budget: Decoding(H2O(budget=budget, window=3, score="obc-joint"), capacity=14, interval=3),
    "decoding-adakv": lambda budget: Decoding(AdaKV(SnapKV(budget=budget, window=3, kernel=3, score="obc-key",
                                                           chunk=2)), capacity=14, interval=2),
    "decoding-tova-shared": lambda budget: Decoding(TOVA(budget=budget, score="obc-value", selection="shared"),
                                                    capacity=12, interval=3),
    "quantized": lambda budget: Quantized(AdaKV(SnapKV(budget=budget, window=3, kernel=3, score="obc-key")), bits=4,
                                          group_size=4),
    "mixed-precision": lambda budget: MixedPrecision(SnapKV(budget=budget, window=3, kernel=3, score="obc-joint",
                                                            chunk=2), byte_budget=0.3, group_size=4),
}

_MODELS: dict[str, torch.nn.Module] = {}


def float64_model(family: str) -> torch.nn.Module:
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family).double()
    return _MODELS[family]


def run(model, policy, rows: list[list[int]]) -> tuple[list[list[int]], list[list[list[list[int]]]]]:
    """Greedy tokens per row and, per layer, per row and KV head, the positions kept (left padding)."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    with policy.attach(model), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True)
    cache = out.past_key_values
    kept = [[[heads.tolist() for heads in row] for row in cache.kept_positions(layer)]
            for layer in range(len(cache.layers))]
    for layer_idx, layer in enumerate(cache.layers):  # stored at several widths: each kept position's width too
        if isinstance(layer, MixedLayer):
            bits, valid = layer.bits(), layer.grid().valid
            for row, heads in enumerate(kept[layer_idx]):
                for head, positions in enumerate(heads):
                    heads[head] = list(zip(positions, bits[row, head][valid[row, head]].tolist()))
    return out.sequences[:, width:].tolist(), kept


def cases():
    """(mode, family, budget, paddings, seed): every mode at every padding 0..2 x CHUNK, batch sizes 2 to 4."""
    families = ("llama", "qwen2", "qwen3")
    paddings = ([3, 0], [0, 1, 2], [4, 5, 6, 0], [7, 8, 0, 2])
    for index, mode in enumerate(MODES):
        for seed, padding in enumerate(paddings):
            budget = 17 if seed == 1 else 0.4  # tokens, or a fraction of each row's prompt
            yield pytest.param(mode, families[(index + seed) % 3], budget, padding, seed, id=f"{mode}-{seed}")


@pytest.mark.parametrize("mode,family,budget,paddings,seed", list(cases()))
def test_a_batched_row_keeps_and_generates_what_it_does_alone(mode, family, budget, paddings, seed):
    model = float64_model(family)
    generator = torch.Generator().manual_seed(seed)
    longest = 44
    rows = [torch.randint(1, 512, (longest - padding,), generator=generator).tolist() for padding in paddings]
    tokens, kept = run(model, MODES[mode](budget), rows)
    for index, row in enumerate(rows):
        alone_tokens, alone_kept = run(model, MODES[mode](budget), [row])
        for layer, layer_kept in enumerate(kept):
            assert layer_kept[index] == alone_kept[layer][0], f"row {index} (padding {paddings[index]}), layer {layer}"
        assert tokens[index] == alone_tokens[0], f"row {index} (padding {paddings[index]})"
