"""VisionZip (baseline): dominant tokens by CLS attention plus a few contextual tokens, in the tower.

At the layer that produces LLaVA's feature layer (the penultimate), keep the patches CLS attends to
most ("dominant"); the rest are grouped around uniformly spaced targets by key cosine similarity and
averaged ("contextual"); each contextual token takes its target's place in the grid. 54 + 10 = 64 in the
paper: `contextual_share` = 10/64 of the budget.
"""
import torch

from ..scores import cls_attention
from ..stages import Split, average_groups, gather_rows, nearest_targets, pack, scatter_rows, spaced, split
from ..step import Reduction, Step
from . import Method, register


@register("visionzip")
class VisionZip(Method):
    contextual_share: float = 10 / 64
    vision_share: float = 1.0

    def vision_sites(self, shape):
        return [shape.feature_layers - 1]

    def reduce_vision(self, step: Step) -> Reduction:
        n_context = torch.round(step.keep.double() * self.contextual_share).long()
        dominant = split(step, cls_attention(step), keep=step.keep - n_context)
        rest = dominant.dropped  # [N, R] candidate indices of the non-dominant patches
        targets, targets_valid = spaced(n_context, dominant.dropped_valid.sum(1), n_context.max().item())
        keys = step.k.transpose(1, 2).flatten(2)  # [N, S, Hkv*d]: heads concatenated
        rest_keys = gather_rows(keys, gather_rows(step.cand, rest))
        group = nearest_targets(rest_keys, targets, targets_valid, dominant.dropped_valid)
        context = average_groups(gather_rows(step.hidden_cand, rest), group, dominant.dropped_valid, targets.shape[1])
        return _combine(step, dominant, gather_rows(rest, targets), targets_valid, context)


def _combine(step: Step, dominant: Split, context_at: torch.Tensor, context_valid: torch.Tensor,
             context: torch.Tensor) -> Reduction:
    """Dominant tokens (own states) and contextual tokens (group means at their targets), ascending."""
    n, v = step.cand.shape
    hidden = scatter_rows(step.hidden_cand, context_at, context, context_valid)  # [N, V, D]
    kept = torch.zeros(n, v, dtype=torch.bool, device=hidden.device)
    kept = scatter_rows(kept, dominant.kept, dominant.kept_valid, dominant.kept_valid)
    kept = scatter_rows(kept, context_at, context_valid, context_valid)
    index, valid = pack(kept)
    return Reduction(index, valid, gather_rows(hidden, index))
