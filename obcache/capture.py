"""The one capture path: every attention layer's state, right after its forward.

`LayerHooks` hands each attention layer's `LayerState` (cached keys/values,
the forward's queries rebuilt on demand, the attention outputs it computed)
to `layer_done`. Eviction (hooks.py), the context reconstruction
(reconstruction.py), the evaluation's fan-out, fidelity and oracle tasks and
the benchmark all build on it.
"""

from __future__ import annotations

import torch
from torch import nn

from obcache.cache import EvictableCache
from obcache.layer_state import LayerState
from obcache.models import FamilyAdapter, attention_layers, check_attention_implementation, check_supported_config


class LayerHooks:
    """Hands every attention layer's state, right after its forward, to `layer_done(layer_idx, state, cache, prefill)`.

    `prefill` is True for the forward that first filled the layer. Only
    forwards on an `EvictableCache` are reported, and only uniform layers.
    A context manager: a post-hook on every attention module, and a pre-hook
    on its output projection that captures the per-head attention outputs
    the model just computed (so the scores need not recompute them).
    """

    def __init__(self, model: nn.Module, *, first: bool = False, attached: bool = False):
        self.first = first  # run before hooks registered earlier (and take the captured queries first)
        self.adapter = check_supported_config(model.config)
        check_attention_implementation(model, attached=attached)  # attached: runs inside `obcache.attach`
        self.model = model
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.attentions = attention_layers(self.decoder)
        self._handles: list = []
        # Attention outputs (o_proj inputs [B, q, Hq * d]) of the current forward, per layer index;
        # each is dropped by the attention module's own post-hook right after.
        self._outputs: dict[int, torch.Tensor] = {}

    def layer_done(self, layer_idx: int, state: LayerState, cache: EvictableCache, prefill: bool) -> None:
        """What to do with a layer's state (subclasses); by default nothing."""

    def wants_state(self, prefill: bool) -> bool:
        """Whether `layer_done` should run after this forward (the state costs a little to build)."""
        return True

    def __enter__(self):
        for attention in self.attentions:
            self._handles.append(attention.register_forward_hook(self._after_attention, with_kwargs=True,
                                                                 prepend=self.first))
            projection = getattr(attention, self.adapter.output_projection or "", None)
            if projection is not None:
                self._handles.append(projection.register_forward_pre_hook(self._capture(attention.layer_idx)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def _capture(self, layer_idx: int):
        outputs = self._outputs

        def hook(module, args):
            outputs[layer_idx] = args[0]

        return hook

    def _after_attention(self, module, args, kwargs, output):
        outputs = self._outputs.pop(module.layer_idx, None)
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, EvictableCache):
            return
        layer = cache.layers[module.layer_idx]
        queries = cache.queries.pop(module.layer_idx, None)  # captured by obcache's attention, if it ran
        normalizers = cache.log_normalizers.pop(module.layer_idx, None) if cache.log_normalizers is not None else None
        prefill = module.layer_idx not in cache.evicted_layers and layer.get_seq_length() == state_queries(args, kwargs)
        if not self.wants_state(prefill):
            return
        state = layer_state(self.adapter, module, args, kwargs, outputs=outputs, queries=queries,
                            log_normalizers=normalizers,
                            rotary_emb=getattr(self.decoder, "rotary_emb", None),
                            num_layers=len(self.attentions))
        with torch.no_grad():
            self.layer_done(module.layer_idx, state, cache, prefill)


def state_queries(args, kwargs) -> int:
    """Tokens of the forward an attention module just ran."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return hidden.shape[1]


def layer_state(
    adapter: FamilyAdapter, module: nn.Module, args, kwargs, *, outputs: torch.Tensor | None = None,
    queries: torch.Tensor | None = None, num_layers: int = 1, rotary_emb: nn.Module | None = None,
    log_normalizers: torch.Tensor | None = None,
) -> LayerState:
    """The policy's view of an attention layer right after a forward.

    For a uniform layer, keys/values are the cached [B, Hkv, n, d] and
    `queries(start, end)` serves the slots of this forward's tokens (the last
    q). A ragged layer gets a shape-only view: keys/values of head_dim 0 over a
    [B, Hkv, W] grid whose segments end at the right edge, and a per-head
    key_mask; its slots are read from `state.layer`. `outputs`, if given, is
    the input of the module's output projection in that forward,
    [B, q, Hq * d] (per-head attention outputs, heads side by side); `queries`,
    if given, the post-RoPE queries [B, Hq, q, d] the attention received
    (otherwise they are rebuilt from the module's input); `log_normalizers`, if
    the attention function recorded them, the queries' log softmax denominators
    [B, Hq, q] (`EvictableCache.log_normalizers`).
    """
    cache = kwargs.get("past_key_values")
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    layer = cache.layers[module.layer_idx]
    cos, sin = kwargs["position_embeddings"]
    tokens = hidden.shape[1]

    captured = queries

    def new_queries() -> torch.Tensor:
        return captured if captured is not None else adapter.queries(module, hidden, cos, sin)

    new_outputs = None
    if outputs is not None and outputs.shape[:2] == hidden.shape[:2]:

        def new_outputs() -> torch.Tensor:
            # [B, q, Hq * dv] -> [B, Hq, q, dv]: the layout of the attention before its reshape (a view).
            heads = outputs.shape[-1] // module.head_dim  # this rank's heads under tensor parallelism
            return outputs.view(outputs.shape[0], tokens, heads, -1).transpose(1, 2)

    if cache.is_ragged(module.layer_idx):
        _, valid = layer.right_aligned()
        keys = values = layer.keys.new_empty(*valid.shape, 0)
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
        new_log_normalizers=log_normalizers,
    )
