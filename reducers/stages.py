"""The shared filter / correlate / compress building blocks (seed 003's vocabulary).

filter: choose which candidates to keep (`split`, `local_penalty`); correlate: link each discarded
candidate to kept ones (`quantile_targets`, `nearest_targets`); compress: fold the discarded into their
targets (`merge_self_preserving_`, `average_groups`). Everything works on padded per-row candidate
tensors [N, V] with a validity mask, so rows (prompts or image crops) never influence each other; the row-index
helpers they build on (`pack`, `gather_rows`, ...) are in rows.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .rows import gather_rows, pack
from .step import Reduction, Step


@dataclass
class Split:
    """Kept and discarded candidates, each as ascending candidate indices [N, K] / [N, R] with validity."""
    kept: Tensor
    kept_valid: Tensor
    dropped: Tensor
    dropped_valid: Tensor

    def reduction(self, hidden: Tensor | None = None) -> Reduction:
        return Reduction(self.kept, self.kept_valid, hidden)


def split(step: Step, keep_score: Tensor, keep: Tensor | None = None) -> Split:
    """filter: keep the `keep` [N] (default step.keep) candidates with the highest `keep_score` [N, V].

    Ties go to the earlier candidate (stable sort), so results are deterministic.
    """
    keep = step.keep if keep is None else keep
    place = descending_position(keep_score.float().masked_fill(~step.cand_valid, float("-inf")))  # [N, V]
    kept_mask = (place < keep[:, None]) & step.cand_valid
    kept, kept_valid = pack(kept_mask)
    dropped, dropped_valid = pack(step.cand_valid & ~kept_mask)
    return Split(kept, kept_valid, dropped, dropped_valid)


def local_penalty(score: Tensor, step: Step, factor: float = 2.0) -> Tensor:
    """Double the highest score in each 2x2 window of the patch grid (spreads discards over the image).

    Scores are shifted to be non-negative first so that doubling always raises the window maximum.
    """
    h, w = step.grid
    n = score.shape[0]
    shifted = (score - score.masked_fill(~step.cand_valid, float("inf")).amin(1, keepdim=True)).clamp(min=0)
    slots = step.slots.masked_fill(~step.cand_valid, h * w)  # padded candidates write to a spare cell
    grid = torch.full((n, h * w + 1), -1.0, device=score.device)  # -1: patch already removed
    grid.scatter_(1, slots, shifted.float())
    _, argmax = F.max_pool2d(grid[:, :h * w].view(n, 1, h, w), 2, ceil_mode=True, return_indices=True)
    boost = torch.ones(n, h * w + 1, device=score.device).scatter_(1, argmax.view(n, -1), factor)
    return shifted * boost.gather(1, slots) * step.cand_valid


def quantile_targets(corr: Tensor, split_: Split, eps: float) -> Tensor:
    """correlate: each discarded i targets the kept j with corr[i, j] >= the eps-quantile of its row.

    corr [N, R, K] (discarded x kept); returns weights alpha [N, R, K] summing to 1 over each row's targets.
    """
    valid = split_.dropped_valid[..., None] & split_.kept_valid[:, None, :]
    if corr.numel() == 0:  # nothing discarded (full budget) or nothing kept
        return corr.float()
    corr = corr.float()
    # torch.nanquantile's linear interpolation, bit for bit, from each row's few largest values (no full sort)
    count = valid.sum(-1, keepdim=True)  # [N, R, 1]
    rank = (torch.tensor(eps, device=corr.device) * (count - 1)).clamp(min=0)
    below, above = (count - 1 - rank.long()).clamp(min=0), (count - 1 - rank.ceil().long()).clamp(min=0)  # from the top
    top = corr.masked_fill(~valid, float("-inf")).topk(int(below.max()) + 1, dim=-1).values  # [N, R, t] descending
    threshold = torch.lerp(top.gather(-1, below), top.gather(-1, above), rank - rank.long())
    chosen = (corr >= threshold) & valid
    weight = corr.clamp(min=0) * chosen
    # a row whose chosen targets all have zero correlation still folds into them, evenly
    weight = torch.where(weight.sum(-1, keepdim=True) > 0, weight, chosen.float())
    return weight / weight.sum(-1, keepdim=True).clamp(min=1e-12)


def merge_self_preserving_(kept_hidden: Tensor, dropped_hidden: Tensor, alpha: Tensor) -> Tensor:
    """compress, in place on kept [N, K, D]: x_j <- (x_j + sum_i alpha_ij x_i) / (1 + sum_i alpha_ij); dropped [N, R, D].

    Only the targets (kept j with some alpha_ij > 0) change, so only they are computed and written."""
    n, k = kept_hidden.shape[:2]
    mass = alpha.sum(1)  # [N, K]
    targets, valid = pack(mass > 0)  # [N, T]
    incoming = gather_rows(alpha.transpose(1, 2), targets) @ dropped_hidden.float()  # [N, T, D]
    merged = (gather_rows(kept_hidden, targets).float() + incoming) / (1 + mass.gather(1, targets))[..., None]
    rows = (targets + k * torch.arange(n, device=targets.device)[:, None])[valid]
    kept_hidden.view(n * k, *kept_hidden.shape[2:]).index_copy_(0, rows, merged[valid].to(kept_hidden.dtype))
    return kept_hidden


def nearest_targets(members: Tensor, targets: Tensor, targets_valid: Tensor, members_valid: Tensor) -> Tensor:
    """correlate by cosine similarity: for each member [N, M, C] the index [N, M] of its most similar target
    [N, T, C]."""
    unit_m, unit_t = F.normalize(members.float(), dim=-1), F.normalize(targets.float(), dim=-1)
    sim = (unit_m @ unit_t.transpose(1, 2)).masked_fill(~targets_valid[:, None, :], float("-inf"))  # [N, M, T]
    return sim.argmax(-1).masked_fill(~members_valid, 0)


def average_groups(hidden: Tensor, assignment: Tensor, members_valid: Tensor, n_groups: int) -> Tensor:
    """compress by averaging: hidden [N, M, D] grouped by assignment [N, M] -> [N, n_groups, D] means."""
    n, m, d = hidden.shape
    weight = members_valid.float()
    sums = torch.zeros(n, n_groups, d, device=hidden.device).scatter_add_(
        1, assignment[..., None].expand(-1, -1, d), hidden.float() * weight[..., None])
    counts = torch.zeros(n, n_groups, device=hidden.device).scatter_add_(1, assignment, weight)
    return (sums / counts[..., None].clamp(min=1)).to(hidden.dtype)


def strided(count: Tensor, available: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """`count` [N] indices into the first `available` [N] members of each row at a fixed stride, 0, s, 2s, ... with
    s = max(1, available // count) (so the last stretch is wider when count does not divide available): [N, width]
    + valid."""
    i = torch.arange(width, device=count.device)
    stride = torch.div(available, count.clamp(min=1), rounding_mode="floor").clamp(min=1)  # [N]
    valid = (i < count[:, None]) & (i * stride[:, None] < available[:, None])
    return (i * stride[:, None]).masked_fill(~valid, 0), valid


def descending_position(score: Tensor) -> Tensor:
    """Each entry's place [N, V] when its row is sorted by `score` from high to low (0: highest; ties: earlier first)."""
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    places = torch.arange(order.shape[1], device=order.device).expand_as(order).contiguous()
    return torch.empty_like(order).scatter_(1, order, places)


def rank_weights(score: Tensor, valid: Tensor) -> Tensor:
    """Rank weights [N, V]: in each row the highest-scoring valid entry gets n (the row's valid count), the next
    n - 1, ..., the lowest 1; padding 0."""
    place = descending_position(score.float().masked_fill(~valid, float("-inf")))
    return (valid.sum(1, keepdim=True) - place).clamp(min=0).float() * valid


def merge_most_similar(hidden: Tensor, targets: Tensor, targets_valid: Tensor, sources: Tensor, sources_valid: Tensor,
                       merges: Tensor) -> tuple[Tensor, Tensor]:
    """correlate + compress between two groups: each source finds its most cosine-similar target, and the `merges` [N]
    sources with the highest such similarity are averaged into their targets (a target becomes the plain mean of
    itself and the sources it absorbs).

    hidden [N, V, D] candidates; targets [N, A] and sources [N, B] index into them. Returns the targets' new states
    [N, A, D] and which sources were absorbed [N, B] (the others stay as they are).
    """
    if targets.shape[1] == 0:  # no targets in any row (a selection of 0 or 1 tokens): nothing merges
        return hidden.new_zeros(targets.shape[0], 0, hidden.shape[2]), torch.zeros_like(sources_valid)
    target_hidden, source_hidden = gather_rows(hidden, targets), gather_rows(hidden, sources)
    unit_t, unit_s = F.normalize(target_hidden.float(), dim=-1), F.normalize(source_hidden.float(), dim=-1)
    sim = (unit_s @ unit_t.transpose(1, 2)).masked_fill(~targets_valid[:, None, :], float("-inf"))  # [N, B, A]
    best, partner = sim.max(-1)  # [N, B]
    absorbed = (descending_position(best.masked_fill(~sources_valid, float("-inf"))) < merges[:, None]) & sources_valid
    n_targets = targets.shape[1]
    members = torch.cat([target_hidden, source_hidden], 1)  # [N, A + B, D]
    group = torch.cat([torch.arange(n_targets, device=targets.device).expand_as(targets), partner], 1)
    return average_groups(members, group, torch.cat([targets_valid, absorbed], 1), n_targets), absorbed
