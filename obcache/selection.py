"""From token scores to the tokens each KV head keeps: pure torch, no transformers.

Every function works on one layer's scores [B, H, L] (H = KV heads, or 1 when
all heads share one set) where protected tokens score +inf and padding -inf,
and answers with a keep mask [B, H, L] (bool). Selection is deterministic: ties
go to the earlier position, so heads with equal scores keep equal sets.

Every batch row is chosen on its own: budgets may differ per row (a [B]
tensor: a float budget is a fraction of each row's own prompt), and spans
start at each row's (or head's) first real slot, so a left-padded row keeps
exactly what it keeps alone.

- `combine_heads`: one score per token for all heads (head-shared selection);
- `chunk_scores`: the mean score of each span of `chunk` consecutive tokens,
  given to all its tokens, so that whole spans are kept or dropped (ChunkKV,
  arXiv 2502.00299);
- `top_k_mask`: the `k` best tokens of every head (uniform budget);
- `adaptive_mask`: `k x H` tokens per layer and batch row, at least `floor` per
  head, the rest to the best scores over all heads (Ada-KV, arXiv 2407.11550);
- `pyramid_budgets`: per-layer budgets that fall linearly with depth, their
  mean equal to the budget (PyramidKV, arXiv 2406.02069).

All of them act per batch row and per layer. Under tensor parallelism each
rank holds some of a layer's KV heads, ranks in head order, and runs them on
its own heads: `top_k_mask` and `chunk_scores` need nothing from the others;
`combine_heads` and `adaptive_mask` take the process `group` and agree with
the other ranks through small collectives (a sum or max over heads; the ranks'
sizes, then the values of each rank's best candidates), so that every rank's
mask equals its part of the single-device mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

HEAD_COMBINES: dict[str, str] = {
    "normalized-mean": "each head's scores divided by their sum over the scored tokens, then averaged over heads",
    "mean": "plain average of the heads' scores",
    "max": "maximum over heads of the normalized scores",
}


def check_combine(combine: str) -> str:
    if not isinstance(combine, str) or combine not in HEAD_COMBINES:
        raise ValueError(f"unknown head combine {combine!r}; allowed: {', '.join(HEAD_COMBINES)}")
    return combine


def combine_heads(scores: torch.Tensor, combine: str = "normalized-mean", group=None) -> torch.Tensor:
    """[B, H, L] finite scores (>= 0) -> [B, 1, L]: one score per token for all heads of a layer
    (with a process `group`: for the heads of every rank)."""
    check_combine(combine)
    if combine != "mean":
        scores = scores / scores.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    if combine == "max":
        return _all_reduce(scores.amax(1, keepdim=True), dist.ReduceOp.MAX, group)
    if group is None:
        return scores.mean(1, keepdim=True)
    heads = _all_reduce(torch.tensor(float(scores.shape[1]), device=scores.device), dist.ReduceOp.SUM, group)
    return _all_reduce(scores.sum(1, keepdim=True), dist.ReduceOp.SUM, group) / heads


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def chunk_scores(scores: torch.Tensor, chunk: int, starts: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, L] -> [B, H, L]: every token gets the mean score of its span [s + c*chunk, s + (c+1)*chunk),
    s = its row's (head's) first real slot, `starts` [B, 1 or H] (default 0); slots before s score 0."""
    if chunk == 1:
        return scores
    batch, heads, length = scores.shape
    spans = -(-length // chunk)
    if starts is None:
        starts = torch.zeros(batch, 1, dtype=torch.long, device=scores.device)
    starts = starts.to(scores.device).long().expand(batch, heads)
    slots = torch.arange(spans * chunk, device=scores.device)
    source = slots + starts[..., None]  # [B, H, spans * chunk]: the row's own tokens from its first one
    inside = source < length
    shifted = scores.gather(-1, source.clamp_max(length - 1)).masked_fill_(~inside, 0.0)
    sizes = inside.view(batch, heads, spans, chunk).sum(-1).clamp_min(1).to(scores.dtype)
    means = shifted.view(batch, heads, spans, chunk).sum(-1) / sizes
    back = torch.arange(length, device=scores.device) - starts[..., None]  # [B, H, L], < 0 before the start
    out = means.gather(-1, back.clamp_min(0) // chunk)
    return out.masked_fill_(back < 0, 0.0)


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting the last dim by decreasing score, ties by increasing position."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def top_k_mask(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """[B, H, L] -> bool [B, H, L]: the k best tokens of each head (0 <= k <= L; k an int or per row [B])."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if isinstance(k, int):
        return mask.scatter_(-1, _ranked(scores)[..., :k], True)
    take = torch.arange(scores.shape[-1], device=scores.device) < k.to(scores.device)[:, None, None]
    return mask.scatter_(-1, _ranked(scores), take.expand_as(mask))


def _per_row(value: int | torch.Tensor, batch: int, device) -> torch.Tensor:
    """An int or a [B] tensor as a [B] long tensor."""
    return torch.as_tensor(value, device=device).long().expand(batch)


def adaptive_mask(scores: torch.Tensor, k: int | torch.Tensor, floor: int | torch.Tensor, group=None) -> torch.Tensor:
    """[B, H, L] -> bool [B, H, L]: k x H tokens per batch row, at least `floor` (<= k) in each head
    (k and floor: ints, or per row [B]).

    Each head first takes its `floor` best tokens; the remaining (k - floor) x H
    slots go to the best of all other tokens of the row, whatever their head.
    With a process `group` whose ranks hold the heads in rank order (any number
    each), H counts every rank's heads and the slots go to the best over all of
    them; each rank sends the values of its own best (k - floor) x H candidates.
    """
    batch, heads, length = scores.shape
    k, floor = _per_row(k, batch, scores.device), _per_row(floor, batch, scores.device)
    mask = top_k_mask(scores, floor)
    rest = scores.masked_fill(mask, float("-inf")).reshape(batch, heads * length)
    order = _ranked(rest)
    # a row with fewer candidates than slots may pick already-kept (-inf) tokens again: harmless
    if group is None:
        taken = (k - floor) * heads
    else:
        taken = _taken_across_ranks(rest.gather(-1, order), k - floor, heads, group)  # [B]
    take = torch.arange(heads * length, device=scores.device) < taken[:, None]
    return mask | torch.zeros_like(take).scatter_(-1, order, take).view(batch, heads, length)


def _taken_across_ranks(ranked: torch.Tensor, per_head: torch.Tensor, heads: int, group) -> torch.Tensor:
    """How many of this rank's candidates (`ranked` [B, n], best first) are among the best
    per_head[b] x (all ranks' heads) of row b over every rank's candidates.

    Merging the ranks' lists in rank order with a stable sort orders ties as one
    device would (by head, then position), so each rank's share is a prefix of its list.
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    sizes = [torch.zeros(2, dtype=torch.long, device=ranked.device) for _ in range(world)]  # (heads, tokens)
    dist.all_gather(sizes, torch.tensor([heads, ranked.shape[1]], device=ranked.device), group=group)
    wanted = per_head * sum(int(size[0]) for size in sizes)  # [B]
    slots = int(wanted.max())  # every rank sends as many, the same on all ranks
    sent = ranked.new_full((ranked.shape[0], slots), float("-inf"))
    sent[:, : min(slots, ranked.shape[1])] = ranked[:, :slots]
    gathered = [torch.empty_like(sent) for _ in range(world)]
    dist.all_gather(gathered, sent, group=group)
    padding = torch.cat([torch.arange(slots, device=ranked.device) >= int(size[1]) for size in sizes])
    order = _ranked(torch.cat(gathered, dim=1))
    order = order.gather(-1, torch.sort(padding[order].byte(), dim=-1, stable=True).indices)  # padding last
    best = torch.arange(order.shape[1], device=ranked.device) < wanted[:, None]  # each row's best `wanted`
    return (best & (order >= me * slots) & (order < (me + 1) * slots)).sum(-1)


def pyramid_budgets(scored: int, num_layers: int, beta: float, capacity: int) -> list[int]:
    """Per-layer scored-token budgets, non-increasing with depth, summing to scored x num_layers.

    Linear from 2s - s/beta (first layer) to s/beta (last layer), s = `scored`,
    rounded by largest remainder so the total is exact; a budget above
    `capacity` (the tokens a layer can hold) is capped and its excess passed to
    the next layers, so the mean is kept whenever s <= capacity.
    """
    if num_layers == 1:
        return [min(scored, capacity)]
    low = scored / beta
    high = 2 * scored - low
    step = (high - low) / (num_layers - 1)
    exact = [high - step * layer for layer in range(num_layers)]
    budgets = [int(value) for value in exact]
    remainders = sorted(range(num_layers), key=lambda layer: (-(exact[layer] - budgets[layer]), layer))
    for layer in remainders[: scored * num_layers - sum(budgets)]:
        budgets[layer] += 1
    excess = 0
    for layer in range(num_layers):
        budgets[layer] += excess
        excess = max(0, budgets[layer] - capacity)
        budgets[layer] -= excess
    return budgets
