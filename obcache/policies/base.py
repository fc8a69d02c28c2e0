"""What every eviction policy shares: the budget, protected tokens and the selection pipeline.

A policy sees one layer at a time, right after a forward, through a
`LayerState`, and answers with a keep mask over the layer's slots. Subclasses
only say how tokens are scored (`token_scores`) and which are protected.

    select(layer) = allocate(prepared_scores(layer), layer_budget(layer), layer)

- `prepared_scores`: the policy's scores [B, Hkv, L]; with `selection="shared"`
  one row [B, 1, L] for all heads (`combine`); with `chunk > 1` span means; then
  protected tokens +inf and padding -inf;
- `layer_budget`: tokens kept per KV head in this layer, per batch row [B];
- `allocate`: the keep mask; here the top `budget` tokens of every head.

Budget wrappers (`obcache.AdaKV`, `obcache.PyramidKV`) replace `allocate` or
`layer_budget` of the policy they wrap, so they compose with any policy,
score and selection mode.

Budget vocabulary (one meaning everywhere): `budget` is what is **kept**, per
layer and KV head, counting protected tokens:

- a float in (0, 1]: the fraction of the prompt kept (kept = round(budget * L),
  L = each batch row's own real prompt length, so a left-padded row keeps what
  it keeps alone);
- an int >= 1: the number of tokens kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from obcache.layer_state import LayerState
from obcache.selector import Selector
from obcache.scores import GQA_REDUCTIONS, SCORE_KINDS, saliency
from obcache.selection import HEAD_COMBINES, chunk_scores, combine_heads, top_k_mask

SELECTIONS: dict[str, str] = {
    "per-head": "every KV head keeps its own best tokens",
    "shared": "one token set per layer, the same in every KV head (scores combined over heads)",
}


def option(default, help: str, choices: dict | None = None, *, noun: str | None = None):
    """A policy hyper-parameter: a dataclass field whose help (and choices) the CLI reads, and whose choices
    `check_choices` enforces (`noun`: what the error calls a value, default the field's name)."""
    return field(default=default, metadata={"help": help, "choices": list(choices) if choices else None,
                                            "noun": noun})


def check_choices(selector) -> None:
    """Raise a clear ValueError for any field whose value is not among its `option(choices=...)`: the one place
    where every named choice of a policy or wrapper is validated."""
    for item in fields(selector):
        choices = item.metadata.get("choices")
        value = getattr(selector, item.name)
        if choices and (not isinstance(value, str) or value not in choices):
            noun = item.metadata.get("noun") or item.name.replace("_", " ")
            raise ValueError(f"unknown {noun} {value!r}; allowed: {', '.join(choices)}")


class Attachable:
    """`attach`, for policies and wrappers alike."""

    def attach(self, model, *, tokenizer=None, chat_template: bool = True):
        """Context manager: under it, `model(...)` and `model.generate(...)` evict with this selector.

        `tokenizer` (and whether prompts use the chat template) matter only to selectors that write prompts of
        their own (KVzip's reconstruction and head ratings)."""
        from obcache.hooks import attach  # the engine, which itself knows policies only as Selectors

        return attach(model, self, tokenizer=tokenizer, chat_template=chat_template)


@dataclass
class Policy(Attachable, Selector):
    """Base class of eviction policies. Fields are the policy's hyper-parameters.

    Subclasses set `name` and `summary`, implement `token_scores`, and declare
    their protected tokens through `window_protected` (the last tokens) and
    `sinks` (the first real tokens). `takes_score` says whether a `score`
    field chooses the token score (see `ScoredPolicy`); `decode_accumulates`
    whether, during decoding (`obcache.Decoding`), scores are summed over
    every query as it passes instead of recomputed from the latest queries.
    """

    name: ClassVar[str] = "policy"
    summary: ClassVar[str] = ""
    takes_score: ClassVar[bool] = False
    decode_accumulates: ClassVar[bool] = False  # during decoding: running sum of every query's score (H2O)
    needs_pooled_heads: ClassVar[bool] = False  # rates whole heads: its budget must move between heads
    allocation: ClassVar[str] = "uniform"  # how its budget spreads over heads and layers (KVzip: a field, "global")

    budget: float | int = option(0.1, "kept per KV head: fraction of the prompt (0.1) or tokens (256)")
    sinks: int = option(0, "first real tokens always kept")
    selection: str = option("per-head", "per-head: each KV head its own tokens; shared: one set per layer", SELECTIONS)
    combine: str = option("normalized-mean", "shared selection: how head scores combine", HEAD_COMBINES,
                          noun="head combine")
    chunk: int = option(1, "keep or drop whole spans of this many consecutive tokens (1 = single tokens)")
    #: Under tensor parallelism, the torch.distributed process group whose ranks hold the KV heads in rank
    #: order: head-shared scores and AdaKV/GlobalKV budgets are then agreed over every rank's heads.
    group: object | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_budget(self.budget)
        check_count("sinks", self.sinks, minimum=0)
        check_count("chunk", self.chunk, minimum=1)
        check_choices(self)
        if isinstance(self.budget, int) and self.chunk > self.budget:
            raise ValueError(f"chunk {self.chunk} is larger than the budget of {self.budget} tokens")

    @property
    def base(self) -> Policy:
        return self

    # -- what subclasses define --

    @property
    def window_protected(self) -> int:
        """How many of the last prompt tokens are always kept."""
        return 0

    @property
    def min_context(self) -> int:
        """The shortest prompt the policy can score (its query window)."""
        return 1

    def token_scores(self, layer: LayerState) -> torch.Tensor:
        """Importance of every cached token, [B, Hkv, L] float32 (higher = keep)."""
        raise NotImplementedError

    # -- the selection pipeline --

    def kept_tokens(self, prompt_length: int) -> int:
        """Tokens kept per KV head for a prompt of `prompt_length` real tokens."""
        if isinstance(self.budget, float):
            return min(prompt_length, max(1, round(self.budget * prompt_length)))
        return min(prompt_length, self.budget)

    def layer_budget(self, layer: LayerState) -> torch.Tensor:
        """[B] tokens kept per KV head in this layer, for each batch row's own prompt."""
        lengths = layer.real_lengths().tolist()
        return torch.tensor([self.kept_tokens(int(n)) for n in lengths], device=layer.keys.device)

    def prepared_scores(self, layer: LayerState, scores: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Hkv or 1, L] float32 (float64 for float64 scores): token scores (given, or `token_scores`) after
        sharing and chunking, which see each row's real tokens only; protected tokens +inf, padding -inf."""
        scores = self.token_scores(layer) if scores is None else scores
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        real = _per_head(layer.key_mask) if layer.key_mask is not None else None
        if real is not None:
            scores = scores.masked_fill(~real, 0.0)
        if self.selection == "shared":
            scores = combine_heads(scores, self.combine, self.group)
        starts = layer.starts()
        scores = chunk_scores(scores, self.chunk, starts if scores.shape[1] > 1 else starts.amin(-1, keepdim=True))
        scores = scores.masked_fill(_per_head(self.protected_mask(layer)), float("inf"))
        if real is not None:
            scores = scores.masked_fill(~real, float("-inf"))
        return scores

    def allocate(self, scores: torch.Tensor, kept: torch.Tensor, layer: LayerState) -> torch.Tensor:
        """Keep mask [B, Hkv, L]: the `kept` [B] best tokens of every head (or of the shared row)."""
        return top_k_mask(scores, kept).expand(-1, layer.kv_heads, -1)

    def scoring(self) -> tuple:
        """What `token_scores` depends on: the class and every option except those that only choose among the
        scored tokens (budget, sinks, selection, combine, chunk). Equal for policies that can share scores."""
        chooses = {"budget", "sinks", "selection", "combine", "chunk"}
        return (type(self), *((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in chooses
                              and f.compare))

    @property
    def chooses_across_heads(self) -> bool:
        """Head-shared selection chooses across heads (AdaKV and GlobalKV do too): under tensor parallelism the
        ranks must then agree (`group`)."""
        return self.selection == "shared"

    @property
    def comparable_across_layers(self) -> bool:
        """Whether the token scores of different layers share one scale (`GlobalKV` then pools them as they are,
        instead of dividing each layer's by its mean)."""
        return False

    @property
    def selects_after_all_layers(self) -> bool:
        """Scores that only a replay after the prefill gives wait for every layer."""
        return self.replay() is not None

    def label(self) -> str:
        changed = [
            f"{item.name}={getattr(self, item.name)}" for item in fields(self)
            if item.name not in ("budget", "score", "selection", "chunk") and item.repr
            and getattr(self, item.name) != item.default
        ]
        parts = [self.name + (f"[{','.join(changed)}]" if changed else "")]
        if self.selection == "shared":
            parts.append("shared")
        if self.chunk > 1:
            parts.append(f"chunk{self.chunk}")
        return "+".join(parts)

    def allocation_label(self) -> str:
        return self.allocation

    # -- checks and protection --

    def check_prompt(self, prompt_lengths: list[int]) -> None:
        """Raise a clear error if the policy cannot run on prompts of these real lengths."""
        shortest = min(prompt_lengths)
        if shortest < self.min_context:
            raise ValueError(
                f"{self.name}: the prompt has {shortest} tokens, shorter than the policy's query window "
                f"({self.min_context}); use a longer context or a smaller window"
            )
        protected = self.window_protected + self.sinks
        for length in sorted(set(prompt_lengths)):  # each row keeps its own budget
            kept = self.kept_tokens(length)
            if kept < length and kept < protected:
                raise ValueError(
                    f"{self.name}: budget {self.budget!r} keeps {kept} tokens of a {length}-token prompt, fewer "
                    f"than the {protected} protected tokens (window {self.window_protected} + sinks {self.sinks}); "
                    "raise the budget or shrink the window/sinks"
                )
            if kept < length and self.chunk > kept:
                raise ValueError(
                    f"{self.name}: chunk {self.chunk} is larger than the {kept} tokens the budget {self.budget!r} "
                    f"keeps of a {length}-token prompt; use a smaller chunk"
                )

    def protected_mask(self, layer: LayerState) -> torch.Tensor:
        """[B, L] bool (or [B, Hkv, L] with a per-head key mask): the last `window_protected` slots and the
        first `sinks` real tokens of each row (head)."""
        length = layer.length
        positions = torch.arange(length, device=layer.keys.device)
        protected = positions >= length - self.window_protected
        if layer.key_mask is not None:
            protected = protected.expand_as(layer.key_mask)
        else:
            protected = protected.expand(layer.keys.shape[0], -1)
        if self.sinks:
            real = layer.key_mask if layer.key_mask is not None else torch.ones_like(protected)
            protected = protected | (real & (real.cumsum(-1) <= self.sinks))
        return protected


@dataclass
class ScoredPolicy(Policy):
    """A policy that ranks tokens by a score of `obcache.scores` (required, checked here)."""

    takes_score: ClassVar[bool] = True

    score: str = option("attention", "token score (higher = keep)", SCORE_KINDS, noun="score kind")
    gqa: str = option("sum", "how the query heads of a KV head combine in the score", GQA_REDUCTIONS,
                      noun="gqa reduction")

    def __post_init__(self) -> None:
        if self.score is None:
            raise ValueError(f"{self.name} needs a score; allowed: {', '.join(SCORE_KINDS)}")
        super().__post_init__()

    def saliency(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, *,
                 reduce: str = "sum", **options) -> torch.Tensor:
        """`obcache.saliency` with this policy's score and GQA reduction (the one place that builds the call)."""
        return saliency(queries, keys, values, self.score, scaling=scaling, gqa=self.gqa, reduce=reduce, **options)

    def window_scores(self, layer: LayerState, start: int, end: int) -> torch.Tensor:
        """The policy's score from the queries of slots start..end-1 over the keys they see, [B, Hkv, end]."""
        queries, outputs = layer.window(start, end)
        mask = layer.key_mask[..., :end] if layer.key_mask is not None else None
        return self.saliency(queries, layer.keys[:, :, :end], layer.values[:, :, :end], layer.scaling,
                             key_mask=mask, outputs=outputs)


@dataclass
class WindowPolicy(ScoredPolicy):
    """A policy scored by its last `window` prompt queries, which it also keeps."""

    window: int = option(16, "query window, also the protected recent tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_count("window", self.window, minimum=1)

    @property
    def window_protected(self) -> int:
        return self.window

    @property
    def min_context(self) -> int:
        return self.window


def _per_head(mask: torch.Tensor) -> torch.Tensor:
    """A [B, L] mask as [B, 1, L]; a per-head [B, Hkv, L] mask as is."""
    return mask.unsqueeze(1) if mask.dim() == 2 else mask


def check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be a float in (0, 1] (fraction kept) or an int >= 1 (tokens kept), got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(
            f"budget {budget} out of range: a float budget is the fraction of the prompt kept, in (0, 1]; "
            "use an int for a number of tokens"
        )
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget {budget} out of range: an int budget is the number of tokens kept, >= 1")


def check_share(name: str, value: float, what: str) -> None:
    """Raise unless `value` is a number in [0, 1] (`what`: the share it is)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] ({what}), got {value!r}")


def check_count(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
