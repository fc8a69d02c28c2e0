"""Eviction and precision together: what a policy keeps, stored in fewer bits (`obcache.layouts.mixed`).

    Quantized(policy, bits=4)                                    # the policy evicts; the rest at 4 bits
    Quantized(recommended(budget=1.0), bits=4, byte_budget=0.025)  # as many tokens as 2.5% of the bytes hold
    MixedPrecision(recommended(budget=0.2), byte_budget=0.025)   # <= 20% of the tokens in 2.5% of the bytes

`Quantized` stores every token the wrapped policy keeps at `bits` (its protected tokens, sinks and window,
at 16): the uniform baseline. With a `byte_budget` it keeps, per layer, as many tokens as that fraction of the
row's full 16-bit cache holds at these widths (`Quantized.fits`), at most the wrapped policy's budget: the
same bytes as `MixedPrecision(policy, byte_budget)`, for comparisons at equal bytes. `MixedPrecision` gives
each (row, KV head, token) a width in `bits` or 0 (evicted), per layer and batch row, minimising the summed
output distortion under a byte budget (`obcache.precision.allocate_widths`, exact):

- distortion of token p at width b: D_p(b) = w_p eps(b), w_p the wrapped policy's score of p (OBCache's: the
  output error of zeroing p, `precision`'s docstring derives the rest) and eps(b) the relative squared error
  of the actual quantizer at b on this layer's keys and values (this row's, `measured_error`), eps(0) = 1;
- bytes: a token's key and value at b (codes, scales, zeros: `bytes_per_token`); 16 bits: 2 bytes an element;
- `byte_budget`: a fraction of the row's full cache at 16 bits per element (whatever dtype runs), everything
  held right after compression counted (codes, scales, zeros, the protected tokens at 16 bits);
- the wrapped policy's budget caps how many tokens stay, at any width (its per-layer budget x Hkv, pooled
  over the heads as AdaKV pools them); protected tokens stay at 16 bits;
- trust: the model linearises the softmax in the logit error, so a width whose key error moves this
  forward's logits by more than LOGIT_TRUST = 1 nat (rms, worst KV head, `precision.logit_noise`) is priced
  as eviction, eps(b) = 1, and never chosen (Qwen2.5's first layers at 4 bits: 1-22 nats).

Under `Decoding`, new tokens enter at 16 bits and each eviction re-allocates the widths of what Decoding keeps,
within `byte_budget` of the 16-bit bytes of the slots the row held before the eviction (Decoding's capacity
plays the prompt's part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from obcache.layer_state import LayerState
from obcache.models import head_dim
from obcache.policies.allocation import GlobalKV, Wrapper, pooled_select
from obcache.policies.base import Policy, check_count
from obcache.precision import allocate_widths, bytes_per_token, check_widths, logit_noise, measured_error
from obcache.selector import Selector, Widths

DEFAULT_BITS = (16, 8, 4)  # MixedPrecision's widths of a kept token (and 0: evicted)

#: Tokens of a layer (per row) on which eps(b) is measured: enough for a stable mean, cheap to quantize.
ERROR_SAMPLE = 2048
QUERY_SAMPLE, LOGIT_SAMPLE = 16, 512  # the latest queries and the keys per KV head the logit check reads
#: nats: a width whose key error moves the logits by more (rms, worst KV head) is priced as eviction (1).
LOGIT_TRUST = 1.0


@dataclass
class Precision(Wrapper):
    """What Quantized and MixedPrecision share: the quantizer's group size, checked against the model before any
    work."""

    group_size: int = 32  # channels of a token that share a scale and a zero

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("group_size", self.group_size, minimum=1)

    def prepare(self, model, tokenizer=None, *, chat_template: bool = True) -> Selector:
        dim = head_dim(model.config)
        if dim % self.group_size:
            divisors = [k for k in range(1, dim + 1) if dim % k == 0]
            raise ValueError(f"group_size {self.group_size} does not divide the head dimension {dim}; allowed: "
                             f"{divisors}")
        return super().prepare(model, tokenizer, chat_template=chat_template)

    def _label(self, **shown) -> str:
        """name[options](inner): `shown` options that are not None, and group_size when not 32."""
        shown = {**shown, "group": self.group_size if self.group_size != 32 else None}
        options = ",".join(f"{name}={value}" for name, value in shown.items() if value is not None)
        return f"{self.name}[{options}]({self.policy.label()})"

    def _check_byte_budget(self, byte_budget) -> None:
        if isinstance(byte_budget, bool) or not isinstance(byte_budget, float) or not 0 < byte_budget <= 1:
            raise ValueError(f"byte_budget is the fraction of the full 16-bit cache's bytes held, a float in (0, 1]; "
                             f"got {byte_budget!r}")

    def _check_protected_fit(self, byte_budget: float, prompt_lengths: list[int]) -> None:
        protected = self.base.window_protected + self.base.sinks
        for length in sorted(set(prompt_lengths)):
            if protected > byte_budget * length:
                raise ValueError(
                    f"byte budget {byte_budget} of a {length}-token prompt holds {byte_budget * length:.1f} "
                    f"tokens at 16 bits per KV head, fewer than the {protected} protected ones (window "
                    f"{self.base.window_protected} + sinks {self.base.sinks}); raise it or protect fewer tokens")

    def _protected(self, layer: LayerState) -> torch.Tensor:
        protected = self.base.protected_mask(layer)
        return (protected.unsqueeze(1) if protected.dim() == 2 else protected).expand(-1, layer.kv_heads, -1)

    def _real(self, layer: LayerState) -> torch.Tensor:
        if layer.key_mask is None:
            return torch.ones(layer.keys.shape[:3], dtype=torch.bool, device=layer.keys.device)
        real = layer.key_mask
        return (real.unsqueeze(1) if real.dim() == 2 else real).expand(-1, layer.kv_heads, -1)


@dataclass
class Quantized(Precision):
    """The wrapped policy evicts as usual; what it keeps is stored at `bits` (2, 4, 8 or 16), its protected
    tokens at 16."""

    name: ClassVar[str] = "quantized"
    bits: int = 4
    #: None: the wrapped policy's budget decides what is kept. A float in (0, 1]: per layer, as many tokens as
    #: this fraction of the row's full 16-bit cache holds (`fits`), at most the wrapped policy's budget.
    byte_budget: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_widths([self.bits])
        if self.bits == 0:
            raise ValueError("Quantized stores what the policy keeps: bits must be 2, 4, 8 or 16, not 0")
        if self.byte_budget is not None:
            self._check_byte_budget(self.byte_budget)

    def label(self) -> str:
        cap = self.budget if self.byte_budget is not None and self.budget != 1.0 else None
        return self._label(bits=self.bits, cap=cap)

    def fits(self, prompt_length: int) -> int:
        """Tokens per KV head that byte_budget x the row's 16-bit bytes hold: the protected ones (window + sinks) at
        16 bits, the rest at `bits` (codes, scales, zeros: `bytes_per_token`; the ratio of a 16-bit token's bytes
        to a packed one's, 16 g / (bits g + 32), does not depend on the head dim)."""
        protected = min(prompt_length, self.base.window_protected + self.base.sinks)
        whole, packed = (bytes_per_token(width, 8 * self.group_size, self.group_size) for width in (16, self.bits))
        spare = int(self.byte_budget * prompt_length * whole) - protected * whole  # bytes, floor as MixedPrecision
        return min(prompt_length, protected + max(0, spare) // packed)

    def kept_tokens(self, prompt_length: int) -> int:
        kept = self.policy.kept_tokens(prompt_length)
        return kept if self.byte_budget is None else min(kept, self.fits(prompt_length))

    def layer_budget(self, layer: LayerState) -> torch.Tensor:
        kept = self.policy.layer_budget(layer)
        if self.byte_budget is None:
            return kept
        fits = torch.tensor([self.fits(int(n)) for n in layer.real_lengths().tolist()], device=kept.device)
        return torch.minimum(kept, fits)

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        super().check_prompt(prompt_lengths)
        if self.byte_budget is not None:
            self._check_protected_fit(self.byte_budget, prompt_lengths)

    def select_layers(self, layers: list[LayerState], scores: list[torch.Tensor]) -> list[Widths]:
        """A policy that pools every layer's heads (GlobalKV, the KVzip family's global allocation) chooses so
        here too, from this selector's budget; any other chooses one layer at a time."""
        pooled = self.policy if isinstance(self.policy, GlobalKV) else None
        if isinstance(self.policy, Policy) and self.policy.allocation == "global":
            pooled = self.policy
        if pooled is None:
            return super().select_layers(layers, scores)
        masks = pooled_select(self, layers, scores, pooled.alpha)
        return [self.precision(layer, mask, s) for layer, mask, s in zip(layers, masks, scores)]

    def precision(self, layer: LayerState, mask: torch.Tensor | None, scores: torch.Tensor | None) -> Widths:
        kept = self._real(layer) if mask is None else mask & self._real(layer)
        bits = torch.where(self._protected(layer), 16, self.bits)
        return Widths(bits.masked_fill(~kept, 0), self.group_size)


@dataclass
class MixedPrecision(Precision):
    """Each token's width in `bits` or 0, priced by the wrapped policy's scores, under `byte_budget`
    (module docstring)."""

    name: ClassVar[str] = "mixed"
    byte_budget: float = 0.05
    #: 2 bits is allowed but not offered by default: measured, it costs more than the distortion model prices it
    #: (RESULTS.md section 6: with it the needle retrieval at 2.5% of the bytes falls from 19-21 to 17-18 of 22)
    bits: tuple[int, ...] = DEFAULT_BITS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bits = tuple(self.bits)
        if 0 in check_widths(self.bits) or not self.bits:
            raise ValueError(f"bits lists the widths a kept token may take, from (16, 8, 4, 2); 0 (evicted) is "
                             f"always allowed; got {self.bits}")
        self._check_byte_budget(self.byte_budget)

    def label(self) -> str:
        return self._label(bits=",".join(map(str, self.bits)), cap=self.budget)  # the widths always: defaults change

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        super().check_prompt(prompt_lengths)
        self._check_protected_fit(self.byte_budget, prompt_lengths)

    # -- the choice: the allocation replaces the policy's top-k, capped by its budget --

    def select(self, layer: LayerState, scores: torch.Tensor | None = None) -> Widths:
        scores = self.token_scores(layer) if scores is None else scores
        caps = self.layer_budget(layer) * layer.kv_heads
        return self._widths(layer, self.prepared_scores(layer, scores), self._real(layer), caps, layer.real_lengths())

    def select_layers(self, layers: list[LayerState], scores: list[torch.Tensor]) -> list[Widths]:
        return [self.select(layer, layer_scores) for layer, layer_scores in zip(layers, scores)]

    def precision(self, layer: LayerState, mask: torch.Tensor | None, scores: torch.Tensor | None) -> Widths:
        """At a decode-time eviction: the widths of what the eviction keeps, within byte_budget of the 16-bit bytes
        of the slots each row held."""
        real = self._real(layer)
        kept = real if mask is None else mask & real
        return self._widths(layer, self.prepared_scores(layer, scores), kept, kept.sum((1, 2)),
                            real.sum((1, 2)) / layer.kv_heads)

    def _widths(self, layer: LayerState, prepared: torch.Tensor, candidates: torch.Tensor, caps: torch.Tensor,
                lengths: torch.Tensor) -> Widths:
        """Per row: widths of the `candidates` [B, Hkv, L], at most caps[b] of them kept, within byte_budget x
        lengths[b] tokens x Hkv at 16 bits."""
        heads = layer.kv_heads
        prepared = prepared.expand(-1, heads, -1)
        protected = (prepared == float("inf")) & candidates
        weights = prepared.masked_fill(~candidates | protected, 0.0).clamp_min(0.0)
        bits = torch.zeros(prepared.shape, dtype=torch.long, device=prepared.device)
        dim = layer.keys.shape[-1]
        token_bytes = {width: 2 * bytes_per_token(width, dim, self.group_size) for width in {*self.bits, 16}}
        for row in range(prepared.shape[0]):
            errors = self._errors(layer, row, candidates[row])
            budget = int(self.byte_budget * int(lengths[row]) * heads * token_bytes[16])
            index = candidates[row].flatten().nonzero().squeeze(1)
            chosen = allocate_widths(weights[row].flatten()[index], budget, errors, token_bytes,
                                     cap=int(caps[row]), protected=protected[row].flatten()[index])
            bits[row].view(-1)[index] = chosen
        return Widths(bits, self.group_size)

    def _errors(self, layer: LayerState, row: int, candidates: torch.Tensor) -> dict[int, float]:
        """eps(b) of each width on this row's keys and values (their mean), measured on the actual quantizer; 1
        (no better than eviction) for a width whose key error moves this forward's attention logits by more
        than LOGIT_TRUST nats (rms, in the worst KV head): there the model's linearisation fails."""
        keys, values = layer.keys[row][candidates], layer.values[row][candidates]  # [n, d]
        sample = _sample(len(keys), ERROR_SAMPLE, keys.device)
        errors = {width: 0.5 * (measured_error(keys[sample], width, self.group_size)
                                + measured_error(values[sample], width, self.group_size)) for width in self.bits}
        if layer.new_queries is None:  # a state without queries (built by hand): no logits to check
            return errors
        queries = layer.new_queries()[row, :, -QUERY_SAMPLE:]  # [Hq, q, d]
        group = queries.shape[0] // layer.kv_heads
        heads = [layer.keys[row, h][candidates[h]] for h in range(layer.kv_heads)]  # [n_h, d] each
        for width in (w for w in self.bits if w != 16):
            noise = max((logit_noise(queries[h * group:(h + 1) * group].reshape(-1, queries.shape[-1]),
                                     keys_h[_sample(len(keys_h), LOGIT_SAMPLE, keys.device)], width, self.group_size,
                                     layer.scaling)
                         for h, keys_h in enumerate(heads) if len(keys_h)), default=0.0)
            if noise > LOGIT_TRUST:
                errors[width] = 1.0
        return errors


def _sample(count: int, most: int, device) -> torch.Tensor:
    """Indices of at most `most` of `count` items, evenly spread."""
    return torch.linspace(0, count - 1, min(count, most), device=device).round().long()
