"""An independent reference for eviction: the FULL cache, with a hand-written attention that hides dropped tokens.

It shares no code with obcache's cache, layouts, masks or positions: plain
`model.generate` on transformers' own DynamicCache, with an attention function
registered here that masks (causal, padding, and per KV head the positions
eviction dropped) and computes softmax(s q k^T) v itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from transformers import AttentionInterface, DynamicCache

Dropped = Callable[[int, int], "torch.Tensor | None"]  # (layer_idx, forward index) -> [B, Hkv, P] bool or None


def keep_masks_dropped(masks: list[torch.Tensor | None]) -> Dropped:
    """Prefill-time eviction: from the 2nd forward on, layer l hides the prompt positions not in masks[l]."""

    def dropped(layer_idx: int, forward: int):
        mask = masks[layer_idx]
        return None if forward == 0 or mask is None else ~mask

    return dropped


@contextmanager
def reference_attention(model, dropped: Dropped, padding: torch.Tensor):
    """While entered, `model` attends with the hand-written masked attention (padding: [B, all tokens] bool)."""
    forward = {"index": -1}

    def attention(module, query, key, value, mask4d, scaling, dropout=0.0, **kwargs):
        if module.layer_idx == 0:
            forward["index"] += 1
        groups = query.shape[1] // key.shape[1]
        q_len, kv_len = query.shape[2], key.shape[2]
        keys, values = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        logits = scaling * query @ keys.transpose(-1, -2)  # [B, Hq, q, kv]
        query_positions = torch.arange(kv_len - q_len, kv_len)
        hidden = (torch.arange(kv_len)[None, :] > query_positions[:, None])[None, None].expand(logits.shape).clone()
        hidden |= ~padding[:, None, None, :kv_len]
        drop = dropped(module.layer_idx, forward["index"])
        if drop is not None:
            width = drop.shape[-1]
            hidden[..., :width] |= drop.repeat_interleave(groups, 1)[:, :, None, :]
        weights = logits.masked_fill(hidden, float("-inf")).softmax(-1).nan_to_num(0.0)
        return (weights @ values).transpose(1, 2).contiguous(), None

    AttentionInterface.register("obcache_masked_reference", attention)
    original = model.config._attn_implementation
    model.set_attn_implementation("obcache_masked_reference")
    try:
        yield
    finally:
        model.set_attn_implementation(original)


def masked_reference(model, ids, steps: int, dropped: Dropped, attention_mask=None):
    """Greedy decoding of `steps` tokens on the full cache with dropped tokens hidden.

    Returns (sequences [B, P + steps], logits [B, steps, V] of each generated step).
    """
    padding = attention_mask.bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    padding = torch.cat([padding, torch.ones(ids.shape[0], steps, dtype=torch.bool)], dim=-1)
    with reference_attention(model, dropped, padding):
        out = model.generate(
            input_ids=ids, attention_mask=attention_mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits, dim=1)


def masked_teacher_forcing(model, ids: list[int], prompt_length: int, masks: list) -> torch.Tensor:
    """Logits [len(ids) - prompt_length, V] of ids[prompt_length:], fed in one forward after a prefill of the
    prompt, on the full cache with the prompt positions each head dropped (~masks[layer]) hidden."""
    tensor = torch.tensor([ids])
    with reference_attention(model, keep_masks_dropped(masks), torch.ones_like(tensor, dtype=torch.bool)), torch.no_grad():
        cache = DynamicCache()
        model(input_ids=tensor[:, :prompt_length], past_key_values=cache)
        return model(input_ids=tensor[:, prompt_length:], past_key_values=cache).logits[0]


def generate_with_logits(model, ids, steps: int, attention_mask=None, **kwargs):
    """(sequences, logits [B, steps, V], past_key_values) of greedy `model.generate`."""
    out = model.generate(
        input_ids=ids, attention_mask=attention_mask, max_new_tokens=steps, do_sample=False, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True, **kwargs,
    )
    return out.sequences, torch.stack(out.logits, dim=1), out.past_key_values
