"""Answer a question about a long context, evicting the cache after prefill; continue in later turns.

One readable path: tokenize (context | question), prefill, evict (inside the
hooks), feed the question if it was not part of the compressed prompt, then
decode greedily token by token on the shrunken cache. A later turn
(`history=result`) feeds only the new user message, at its true positions, on
the evicted cache of the turn before:

    first = obcache.generate(model, tokenizer, document, "Who signed it?", policy=policy)
    second = obcache.generate(model, tokenizer, "And when?", history=first)

Query-agnostic compression serves any number of questions: `ask` answers one
more on the compressed context alone (a fork of the cache as compression left
it), not seeing the other questions:

    other = obcache.ask(model, tokenizer, first, "Where was it signed?")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from obcache.cache import EvictableCache
from obcache.compat import cache_argument
from obcache.hooks import attach
from obcache.models import position_limit
from obcache.selector import Selector


@dataclass
class GenerationResult:
    """The answer and what eviction did.

    kept_per_layer: tokens per KV head in each layer right after eviction.
    cache_bytes_full / cache_bytes_kept: KV bytes before and after eviction.
    prefill_seconds includes eviction_seconds; decode_seconds covers feeding the
    question (query-agnostic mode) and the greedy decoding. `cache`,
    `messages` and `pending` let a later turn continue (`generate(..., history=result)`):
    the cache after this turn, the conversation so far, and the generated
    token not yet fed to the model (when generation stopped at max_new_tokens).
    `context` and `compressed` (query-agnostic compression only: the cache right
    after it) let `ask` put other questions to the same compressed context;
    later turns carry them on. `selector`: the policy, which keeps evicting
    during decoding in later turns and questions if it does (`obcache.Decoding`).
    `calibration_seconds`: the time this call spent preparing the policy for the
    model first (head-level KVzip rates the heads once per model), not part of the prefill.
    """

    text: str
    token_ids: list[int]
    context_tokens: int
    question_tokens: int
    kept_per_layer: list[int]
    cache_bytes_full: int
    cache_bytes_kept: int
    prefill_seconds: float
    eviction_seconds: float
    decode_seconds: float
    policy: str = "full cache"
    selector: Selector | None = field(default=None, repr=False)
    cache: EvictableCache | None = field(default=None, repr=False)
    messages: list[dict] = field(default_factory=list, repr=False)
    pending: list[int] = field(default_factory=list, repr=False)
    chat_template: bool = True
    context: str = field(default="", repr=False)
    compressed: EvictableCache | None = field(default=None, repr=False)
    calibration_seconds: float = 0.0

    @property
    def tokens_seen(self) -> int:
        """Tokens of the prompt the model saw (context + question)."""
        return self.context_tokens + self.question_tokens

    def summary(self) -> str:
        """One line describing the eviction."""
        # mean over layers: per-layer budgets differ under PyramidKV and GlobalKV
        kept = round(sum(self.kept_per_layer) / len(self.kept_per_layer), 1) if self.kept_per_layer else 0
        compressed = self.context_tokens if self.cache_bytes_full and kept < self.context_tokens else None
        ratio = f"{self.cache_bytes_kept / self.cache_bytes_full:.1%}" if self.cache_bytes_full else "100%"
        what = f"kept {kept:g}/{compressed} tokens per head" if compressed else "kept all tokens"
        return (
            f"{self.policy}: {what}, cache {self.cache_bytes_full / 2**20:.1f} -> {self.cache_bytes_kept / 2**20:.1f} MiB "
            f"({ratio}); prefill {self.prefill_seconds:.2f}s (eviction {self.eviction_seconds:.3f}s), "
            f"decode {len(self.token_ids)} tokens in {self.decode_seconds:.2f}s"
            + (f"; heads rated once for this model in {self.calibration_seconds:.1f}s"
               if self.calibration_seconds >= 0.05 else "")
        )


def build_prompt(tokenizer, context: str, question: str | None, *, chat_template: bool = True, answer_prefix: str = "") -> tuple[list[int], list[int]]:
    """Token ids of (context part, question part), split where the question starts.

    With the chat template the context part ends inside the user turn; the
    question part holds the question, the end of the turn, the assistant header
    and `answer_prefix`. Both modes (query-aware or not) use the same ids.
    """
    question = question or ""
    separator = "\n\n" if question else ""
    if chat_template:
        marker = "\x00OBCACHE_QUESTION\x00"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + separator + marker}], tokenize=False, add_generation_prompt=True
        )
        head, tail = rendered.split(marker)
        context_text, question_text = head, question + tail + answer_prefix
    else:
        context_text, question_text = context + separator, question + ("\n" + answer_prefix if answer_prefix else "")
    context_ids = tokenizer(context_text, add_special_tokens=not chat_template)["input_ids"]
    question_ids = tokenizer(question_text, add_special_tokens=False)["input_ids"] if question_text else []
    return context_ids, question_ids


@torch.no_grad()
def generate(
    model,
    tokenizer,
    context: str,
    question: str | None = None,
    *,
    policy: Selector | None = None,
    query_aware: bool = False,
    max_new_tokens: int = 64,
    chat_template: bool = True,
    answer_prefix: str = "",
    history: GenerationResult | None = None,
) -> GenerationResult:
    """Prefill `context` (plus `question` if `query_aware`), evict with `policy`, then answer greedily.

    Query-agnostic (default): the question comes after compression, so the kept
    tokens cannot depend on it (the cache could serve any question).
    With `history` (the result of an earlier turn), `context` (plus `question`)
    is the next user message, fed on a fork of that turn's evicted cache (the
    history stays as it was); `policy` then only matters if it evicts during
    decoding (`obcache.Decoding`), and defaults to the history's.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if history is not None:
        return _next_turn(model, tokenizer, history, context, question, policy=policy,
                          max_new_tokens=max_new_tokens, answer_prefix=answer_prefix)
    context_ids, question_ids = build_prompt(tokenizer, context, question, chat_template=chat_template, answer_prefix=answer_prefix)
    prefill_ids = context_ids + question_ids if query_aware else context_ids
    if not prefill_ids:
        raise ValueError("the prompt is empty: give a context (or a question with query_aware=True)")
    check_positions(model.config, len(context_ids) + len(question_ids), max_new_tokens)
    calibration = 0.0
    if policy is not None:
        start = time.perf_counter()
        policy = policy.prepare(model, tokenizer, chat_template=chat_template)  # head-level KVzip: rated once
        calibration = time.perf_counter() - start
        policy.check_prompt([len(prefill_ids)])
    separator = "\n\n" if question else ""
    return _turn(
        model, tokenizer, EvictableCache(config=model.config), prefill_ids, [] if query_aware else question_ids,
        policy=policy, chat_template=chat_template, max_new_tokens=max_new_tokens, answer_prefix=answer_prefix,
        messages=[{"role": "user", "content": context + separator + (question or "")}], compress=not query_aware,
        context=context, context_tokens=len(context_ids), question_tokens=len(question_ids),
        calibration_seconds=calibration,
    )


@torch.no_grad()
def ask(model, tokenizer, compressed: GenerationResult, question: str, *, max_new_tokens: int = 64,
        answer_prefix: str = "") -> GenerationResult:
    """Answer `question` on the context that `compressed` (a query-agnostic `generate` result, or a later turn of
    its conversation) compressed.

    The question sees the compressed context only, not the other questions or answers: its cache is a
    fork of the compressed one (`EvictableCache.fork`), so any number of questions share one compression.
    A policy that evicts during decoding keeps doing so.
    """
    if compressed.compressed is None:
        raise ValueError("this result compressed its question with the context (query_aware=True); "
                         "only a query-agnostic compression can serve other questions")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _, question_ids = build_prompt(tokenizer, compressed.context, question, chat_template=compressed.chat_template,
                                   answer_prefix=answer_prefix)
    cache = compressed.compressed.fork()
    check_positions(model.config, cache.seen_tokens + len(question_ids), max_new_tokens)
    return _turn(
        model, tokenizer, cache, question_ids, [], policy=compressed.selector, chat_template=compressed.chat_template,
        max_new_tokens=max_new_tokens, answer_prefix=answer_prefix,
        messages=[{"role": "user", "content": compressed.context + "\n\n" + question}], compress=False,
        context=compressed.context, context_tokens=compressed.context_tokens, question_tokens=len(question_ids),
        compressed=compressed.compressed,
    )


def _next_turn(model, tokenizer, history: GenerationResult, message: str, question: str | None, *, policy,
               max_new_tokens: int, answer_prefix: str) -> GenerationResult:
    """One more user message and answer on the cache of `history` (see `generate`)."""
    if history.cache is None:
        raise ValueError("history has no cache to continue (it was not made by obcache.generate)")
    content = message + ("\n\n" + question if question else "")
    if not content:
        raise ValueError("the next turn's message is empty")
    ids = history.pending + turn_ids(tokenizer, history.messages, content, chat_template=history.chat_template,
                                     answer_prefix=answer_prefix)
    cache = history.cache.fork()  # the history stays as it was: a retry or a second branch starts from it too
    check_positions(model.config, cache.seen_tokens + len(ids), max_new_tokens)
    return _turn(
        model, tokenizer, cache, ids, [], policy=history.selector if policy is None else policy,
        chat_template=history.chat_template, max_new_tokens=max_new_tokens, answer_prefix=answer_prefix,
        messages=history.messages + [{"role": "user", "content": content}], compress=False,
        context=history.context, context_tokens=len(ids), question_tokens=0, compressed=history.compressed,
    )


def _turn(model, tokenizer, cache: EvictableCache, ids: list[int], rest_ids: list[int], *, policy: Selector | None,
          chat_template: bool, max_new_tokens: int, answer_prefix: str, messages: list[dict], compress: bool,
          **fields) -> GenerationResult:
    """Feed `ids` on `cache` under `policy` (timed as the prefill on a fresh cache), then `rest_ids`, then decode
    greedily; the one place a `GenerationResult` is assembled (`fields`: the rest of its fields)."""
    engine = attach(model, policy, tokenizer=tokenizer, chat_template=chat_template)
    fresh = cache.seen_tokens == 0
    with engine:
        start = time.perf_counter()
        logits = forward_tokens(model, cache, ids)
        prefill_seconds = time.perf_counter() - start if fresh else 0.0
        kept_per_layer, bytes_kept = cache.kept_tokens(), cache.kv_nbytes()
        if compress:
            fields["compressed"] = cache.fork()
        generated, pending = continue_greedy(model, cache, logits, rest_ids, eos=eos_token_ids(model, tokenizer),
                                             max_new_tokens=max_new_tokens, return_pending=True)
        decode_seconds = time.perf_counter() - start - prefill_seconds
    text = tokenizer.decode(generated, skip_special_tokens=True)
    selector = engine.policy
    return GenerationResult(
        text=text, token_ids=generated, kept_per_layer=kept_per_layer, cache_bytes_full=cache.full_bytes or bytes_kept,
        cache_bytes_kept=bytes_kept, prefill_seconds=prefill_seconds, eviction_seconds=cache.eviction_seconds,
        decode_seconds=decode_seconds, policy=repr(selector) if selector is not None else "full cache",
        selector=selector, cache=cache, messages=messages + [{"role": "assistant", "content": answer_prefix + text}],
        pending=pending, chat_template=chat_template, **fields,
    )


def check_positions(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise, before any work, if the prompt and the answer would pass the position limit of a model's `config`
    (`max_position_embeddings`): positions beyond it give garbage, silently."""
    limit = position_limit(config)
    if limit is None:
        return
    if prompt_tokens > limit:
        raise ValueError(f"the prompt has {prompt_tokens} tokens, more than the model's limit of {limit} positions "
                         "(max_position_embeddings); shorten the context")
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"the prompt ({prompt_tokens} tokens) plus max_new_tokens={max_new_tokens} pass the "
                         f"model's limit of {limit} positions (max_position_embeddings); lower max_new_tokens to "
                         f"{limit - prompt_tokens} or shorten the context")


def turn_ids(tokenizer, messages: list[dict], content: str, *, chat_template: bool, answer_prefix: str = "") -> list[int]:
    """Token ids that follow a conversation's last answer: its end of turn, the next user turn, the answer header.

    Found by rendering the conversation with and without the new turn, so any
    chat template that renders messages verbatim works.
    """
    if not chat_template:
        return tokenizer("\n\n" + content + ("\n" + answer_prefix if answer_prefix else ""), add_special_tokens=False)["input_ids"]
    *earlier, last = messages
    head = tokenizer.apply_chat_template(earlier, tokenize=False, add_generation_prompt=True) + last["content"]
    done = tokenizer.apply_chat_template(messages, tokenize=False)
    following = tokenizer.apply_chat_template(messages + [{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
    if not (done.startswith(head) and following.startswith(done)):
        raise ValueError("this chat template does not render earlier turns verbatim; continue with model.generate")
    text = done[len(head):] + following[len(done):] + answer_prefix
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def forward_tokens(model, cache: EvictableCache, ids: list[int], *, every_position: bool = False) -> torch.Tensor:
    """Feed `ids` on top of `cache` at their true (logical) positions (batch 1).

    Returns the next-token logits [1, V], or with `every_position` the logits
    [n, V] of every fed token (teacher forcing).
    """
    tensor = torch.tensor([ids], device=model.device)
    positions = cache.positions_for(len(ids), model.device)
    logits = model(
        input_ids=tensor, position_ids=positions, **cache_argument(model, cache), use_cache=True,
        logits_to_keep=0 if every_position else 1,
    ).logits
    return logits[0] if every_position else logits[:, -1]


@torch.no_grad()
def continue_greedy(
    model, cache: EvictableCache, logits: torch.Tensor, rest_ids: list[int], *, eos: set[int], max_new_tokens: int,
    return_pending: bool = False,
):
    """After a forward that gave `logits` [1, V]: feed `rest_ids` (if any), then decode greedily.

    Stops at an `eos` token (not returned) or after `max_new_tokens` tokens; grows `cache`.
    Returns the generated ids; with `return_pending`, also the ids generated but
    not yet fed (the last one when stopped at max_new_tokens).
    """
    if rest_ids:
        logits = forward_tokens(model, cache, rest_ids)
    generated: list[int] = []
    pending: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax(-1))
        if token in eos:
            break
        generated.append(token)
        if len(generated) == max_new_tokens:
            pending = [token]
            break
        logits = forward_tokens(model, cache, [token])
    return (generated, pending) if return_pending else generated


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids of the model's generation config and of the tokenizer."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
