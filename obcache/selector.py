"""The contract between the engine and the policies: one abstract base, `Selector` (torch only).

The engine (`obcache.hooks`) knows policies only through this class; it never
asks whether an attribute exists, and imports no policy. `Policy` (a scored
eviction method) and the wrappers (`AdaKV`, `PyramidKV`, `GlobalKV`,
`Decoding`) derive from it, and the defaults here say what a selector that
does not override them does:

- `prepare(model, tokenizer)`: a selector ready to evict on `model` (KVzip's
  head ratings are fitted here); by default the selector itself;
- `check_prompt(lengths)`: refuse prompts it cannot evict, before any work;
- after the prefill, one layer at a time: `select(layer)`; or, when
  `selects_after_all_layers`, once per prefill: `select_layers(layers, scores)`
  from each layer's `token_scores`, or from the scores of extra forwards that
  `replay()` asks for (KVzip's context reconstruction);
- after every later forward, for each layer: `decode_step(cache_layer, queries, outputs)`, before any state is built
  (note what the policy keeps between forwards; whether to choose now), then, where it says so,
  `decode_select(layer)` (none by default: only `Decoding` evicts while decoding).

Every keep mask is a bool tensor [B, Hkv, L] over the layer's slots (None = keep all). A selector that also
chooses how each kept slot is stored (`obcache.Quantized`, `obcache.MixedPrecision`) answers with `Widths`
instead, through `precision`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import ClassVar, NamedTuple, Protocol

import torch

from obcache.layer_state import LayerState


class Widths(NamedTuple):
    """Per slot of a layer's grid [B, Hkv, L], the bits it is stored at: 0 dropped, 16 in 16-bit floats, 8/4/2 packed
    in groups of `group_size` channels of a token (`obcache.layouts.mixed`)."""

    bits: torch.Tensor
    group_size: int


class Replay(Protocol):
    """Extra forwards after the prefill whose queries score the context (KVzip: the model repeats it)."""

    def replay_inputs(self, tokenizer, context_ids: list[int], *, chat_template: bool) -> list[list[int]]:
        """The token ids of each extra forward, fed on a scratch copy of the prefill's cache."""

    def replay_scores(self, layer: LayerState, context_length: int) -> torch.Tensor:
        """[B, Hkv, context_length] scores of the context tokens from one extra forward's queries."""

    def merge(self, total: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """The scores of two extra forwards combined."""

    def replay_scoring(self) -> Hashable:
        """Equal for replays that score alike (they share one computation)."""


class Selector(ABC):
    """What the engine asks of a policy or of a wrapper around one; see the module docstring."""

    name: ClassVar[str] = "selector"

    # -- what the engine reads --

    @property
    @abstractmethod
    def base(self):
        """The policy that scores the tokens (itself for a policy; for a wrapper, the one it wraps, innermost)."""

    @property
    def group(self):
        """Under tensor parallelism, the torch.distributed process group of the ranks that hold the KV heads."""
        return None

    @property
    def chooses_across_heads(self) -> bool:
        """Whether one KV head's kept tokens depend on the others' scores (the ranks must then agree)."""
        return False

    @property
    def selects_after_all_layers(self) -> bool:
        """Whether the choice waits for every layer of the prefill (`select_layers`) instead of one at a time."""
        return False

    @property
    def evicts_while_decoding(self) -> bool:
        """Whether `decode_select` runs after every forward that follows the prefill."""
        return False

    def replay(self) -> Replay | None:
        """The extra forwards whose queries score the context after the prefill; None: the prefill's own."""
        return None

    def prepare(self, model, tokenizer=None, *, chat_template: bool = True) -> Selector:
        """This selector made ready to evict on `model` (by default itself); raises a clear error if it cannot."""
        return self

    # -- the choice --

    @abstractmethod
    def check_prompt(self, prompt_lengths: list[int]) -> None:
        """Raise a clear ValueError, before any model work, if prompts of these real lengths cannot be evicted."""

    @abstractmethod
    def kept_tokens(self, prompt_length: int) -> int:
        """Tokens kept per KV head (on average over heads and layers) for a prompt of `prompt_length` tokens."""

    @abstractmethod
    def scoring(self) -> Hashable:
        """What `token_scores` depends on: equal for selectors that can share one layer's scores."""

    @abstractmethod
    def token_scores(self, layer: LayerState) -> torch.Tensor:
        """Importance of every slot of the layer, [B, Hkv, L] (higher = keep)."""

    @abstractmethod
    def layer_budget(self, layer: LayerState) -> torch.Tensor:
        """[B] tokens kept per KV head in this layer, for each batch row's own prompt."""

    @abstractmethod
    def prepared_scores(self, layer: LayerState, scores: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Hkv or 1, L]: token scores (given, or `token_scores`) ready to rank; protected +inf, padding -inf."""

    @abstractmethod
    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer: LayerState) -> torch.Tensor:
        """Keep mask [B, Hkv, L] from prepared scores and the [B] budget."""

    def select(self, layer: LayerState, scores: torch.Tensor | None = None) -> torch.Tensor | None:
        """After the prefill: keep mask of the layer's slots, from `scores` (its `token_scores`, if computed
        already) or computed here; None when every row keeps all its tokens.

            select(layer) = allocate(prepared_scores(layer), layer_budget(layer), layer)
        """
        kept = self.layer_budget(layer)
        if bool((kept >= layer.real_lengths()).all()):
            return self.precision(layer, None, scores)
        return self.precision(layer, self.allocate(self.prepared_scores(layer, scores), kept, layer), scores)

    def select_layers(self, layers: list[LayerState], scores: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Keep masks of every layer at once, from each layer's scores."""
        return [self.select(layer, layer_scores) for layer, layer_scores in zip(layers, scores)]

    def precision(self, layer: LayerState, mask: torch.Tensor | None,
                  scores: torch.Tensor | None) -> torch.Tensor | Widths | None:
        """How the slots a keep mask keeps are stored: by default as they are (the mask itself); `Widths` for
        the selectors that also choose their precision. `scores`: the layer's token scores, if computed."""
        return mask

    @property
    def decode_room(self) -> int:
        """Slots per KV head that an evicted layer should hold room for: the appends before this selector evicts
        it again (0: it never does; `Decoding`: its interval)."""
        return 0

    def decode_step(self, cache_layer, new_queries: torch.Tensor, new_outputs: torch.Tensor | None = None) -> bool:
        """After a forward that follows the prefill, for every layer (`obcache.layouts` layer, this forward's
        post-RoPE queries [B, Hq, q, d] and, where captured, attention outputs as the output projection received
        them [B, q, Hq x dv]), before its state is built: note what the selector keeps between forwards, and
        whether `decode_select` should run now (by default: always)."""
        return True

    def decode_select(self, layer: LayerState) -> torch.Tensor | None:
        """After a forward that follows the prefill: keep mask of the layer's slots, or None to keep them all."""
        return None

    @abstractmethod
    def label(self) -> str:
        """A short name of the method: "snapkv", "snapkv[kernel=15]+shared+chunk8", "adakv(snapkv)", ..."""

    @abstractmethod
    def allocation_label(self) -> str:
        """How the budget spreads: "uniform", or the wrappers' names outermost first ("adakv+pyramid")."""
