"""The one capture path: every attention layer's state, right after its forward, for the observers.

An `Observer` is what `attach` calls after each attention layer (`layer_done`,
with the layer's `LayerState`) and after each decoder forward
(`forward_done`). Eviction (obcache.eviction), the prefill fan-out's mask
recorder (obcache.fanout), KVzip's replay scoring (obcache.after_prefill),
and the evaluation's output and query captures are observers.

`layer_state` builds the policy's view of a layer: its cached keys and
values, the forward's queries (captured by obcache's attention function, or
rebuilt from the module's input), and the attention outputs it computed.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from obcache.forward import ForwardRecord
from obcache.layer_state import LayerState
from obcache.models import FamilyAdapter

class Engine(Protocol):
    """What an observer may use of the attachment it runs in (`obcache.hooks.Attachment`): the model, the prompt
    settings, and more observers for extra forwards (KVzip's replay)."""

    model: nn.Module
    tokenizer: object
    chat_template: bool

    def observing(self, observer: Observer) -> AbstractContextManager[None]:
        """While inside, `observer` sees every layer too, first."""


class Observer:
    """Sees every attention layer of the attached model right after its forward; by default does nothing."""

    #: Whether the attention function should record each query's log softmax denominator (KVzip's replay).
    wants_log_normalizers: bool = False

    def before_prefill(self, prompt_lengths: list[int], record: ForwardRecord) -> None:
        """Before the first forward on a cache runs: raise a clear error if the prompts cannot be served."""

    def wants(self, record: ForwardRecord) -> bool:
        """Whether `layer_done` should run for this forward (the state costs a little to build)."""
        return True

    def layer_passed(self, record: ForwardRecord, layer_idx: int) -> bool:
        """Right after layer `layer_idx`'s attention forward (of a forward it `wants`), before its state is built:
        whether `layer_done` should run for it (by default: yes)."""
        return True

    def layer_done(self, state: LayerState, record: ForwardRecord) -> None:
        """A layer's state right after its attention forward."""

    def forward_done(self, record: ForwardRecord, engine: Engine) -> None:
        """After the decoder's forward (every layer done)."""


def layer_state(adapter: FamilyAdapter, module: nn.Module, args, kwargs, record: ForwardRecord, *,
                num_layers: int, rotary_emb: nn.Module | None = None) -> LayerState:
    """The policy's view of an attention layer right after a forward.

    For a uniform layer, keys/values are the cached [B, Hkv, n, d] and
    `queries(start, end)` serves the slots of this forward's tokens (the last
    q). A paged layer gets a shape-only view: keys/values of head_dim 0 over
    its [B, Hkv, W] grid (segments right-aligned) and a per-head key_mask;
    `state.with_slots()` gathers its keys and values when a policy needs them
    (only at evictions). The queries, attention
    outputs ([B, q, Hq * d] at the output projection's input) and
    log-normalizers come from the record (queries are rebuilt from the
    module's input when the attention function did not record them).
    """
    cache = record.cache
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    layer = cache.layers[module.layer_idx]
    cos, sin = kwargs["position_embeddings"]
    tokens = hidden.shape[1]
    captured = record.queries.get(module.layer_idx)
    outputs = record.outputs.get(module.layer_idx)

    def new_queries() -> torch.Tensor:
        return captured if captured is not None else adapter.queries(module, hidden, cos, sin)

    new_outputs = None
    if outputs is not None and outputs.shape[:2] == hidden.shape[:2]:

        def new_outputs() -> torch.Tensor:
            # [B, q, Hq * dv] -> [B, Hq, q, dv]: the layout of the attention before its reshape (a view).
            heads = outputs.shape[-1] // module.head_dim  # this rank's heads under tensor parallelism
            return outputs.view(outputs.shape[0], tokens, heads, -1).transpose(1, 2)

    if not layer.uniform:
        valid = layer.valid()
        keys = values = torch.empty(*valid.shape, 0, dtype=layer.dtype, device=layer.device)
        key_mask, first = valid, None
    else:
        keys, values, key_mask = layer.keys, layer.values, layer.slot_mask()
        first = layer.get_seq_length() - tokens  # slot of this forward's first token

    def rows(start: int, end: int) -> slice:
        if first is None or start < first:
            raise ValueError(f"only the slots of this forward's {tokens} tokens have queries, not slot {start}")
        return slice(start - first, end - first)

    def window_queries(start: int, end: int) -> torch.Tensor:
        part = rows(start, end)
        if captured is not None:
            return captured[:, :, part]
        return adapter.queries(module, hidden[:, part], cos[:, part], sin[:, part])

    window_outputs = None
    if new_outputs is not None:

        def window_outputs(start: int, end: int) -> torch.Tensor:
            return new_outputs()[:, :, rows(start, end)]

    rotate = None
    if rotary_emb is not None:

        def rotate(x: torch.Tensor, offset: int) -> torch.Tensor:
            return adapter.rotate(module, rotary_emb, x, offset)

    return LayerState(
        keys=keys,
        values=values,
        scaling=module.scaling,
        query_heads=module.config.num_attention_heads * keys.shape[1] // module.config.num_key_value_heads,
        key_mask=key_mask,
        queries=window_queries,
        outputs=window_outputs,
        layer_idx=module.layer_idx,
        num_layers=num_layers,
        layer=layer,
        new_queries=new_queries,
        new_outputs=new_outputs,
        rotate=rotate,
        new_log_normalizers=record.log_normalizers.get(module.layer_idx),
    )
