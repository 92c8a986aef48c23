"""VisionZip (baseline): dominant tokens by CLS attention plus a few contextual tokens, in the tower.

Follows the authors' code (dvlab-research/VisionZip, visionzip/clip_encoder.py and utils.py). At the layer that
produces LLaVA's feature layer (the penultimate), keep the patches CLS attends to most ("dominant"). Of the R
remaining patches, C at a fixed stride (0, s, 2s, ... with s = R // C) are targets; every other remaining patch
joins the target whose key is most cosine-similar, the keys being that layer's keys averaged over heads; a
contextual token is its target's state plus the mean of the patches that joined it (the target's own state when
none did), and takes its target's place in the grid. 54 + 10 = 64 in the paper: `contextual_share` = 10/64 of the
budget. Budget convention: the authors spend one of the N tokens on CLS; LLaVA-1.5's `default` feature strategy
drops CLS, so here all N are patches.
"""
import torch

from ..scores import cls_attention
from ..rows import gather_rows, pack, scatter_rows, unpack
from ..stages import Split, average_groups, nearest_targets, split, strided
from ..step import Reduction, Step
from . import Method, register


@register("visionzip")
class VisionZip(Method):
    contextual_share: float = 10 / 64
    vision_share: float = 1.0

    def vision_sites(self, shape):
        return [shape.feature_layers - 1]

    def reduce_vision(self, step: Step) -> Reduction:
        n_context = torch.round(step.keep.double() * self.contextual_share).long()  # [N]
        dominant = split(step, cls_attention(step), keep=step.keep - n_context)
        rest, rest_valid = dominant.dropped, dominant.dropped_valid  # [N, R] candidate indices of the other patches
        targets, targets_valid = strided(n_context, rest_valid.sum(1), int(n_context.max()))  # [N, C] into `rest`
        if targets.shape[1] == 0:  # a budget too small for any contextual token
            return dominant.reduction()
        joining, joining_valid = pack(rest_valid & ~unpack(targets, targets_valid, rest.shape[1]))  # [N, M] into `rest`
        keys = step.k.float().mean(1)  # [N, S, d]: averaged over heads, as the authors do
        rest_keys = gather_rows(keys, gather_rows(step.cand, rest))  # [N, R, d]
        group = nearest_targets(gather_rows(rest_keys, joining), gather_rows(rest_keys, targets), targets_valid,
                                joining_valid)  # [N, M] into `targets`
        rest_hidden = gather_rows(step.hidden_cand, rest)  # [N, R, D]
        joined = average_groups(gather_rows(rest_hidden, joining), group, joining_valid, targets.shape[1])  # 0 if none
        context = (gather_rows(rest_hidden, targets).float() + joined.float()).to(rest_hidden.dtype)  # [N, C, D]
        return _combine(step, dominant, gather_rows(rest, targets), targets_valid, context)


def _combine(step: Step, dominant: Split, context_at: torch.Tensor, context_valid: torch.Tensor,
             context: torch.Tensor) -> Reduction:
    """Dominant tokens (own states) and contextual tokens (at their targets' places), ascending."""
    n, v = step.cand.shape
    hidden = scatter_rows(step.hidden_cand, context_at, context, context_valid)  # [N, V, D]
    kept = torch.zeros(n, v, dtype=torch.bool, device=hidden.device)
    kept = scatter_rows(kept, dominant.kept, dominant.kept_valid, dominant.kept_valid)
    kept = scatter_rows(kept, context_at, context_valid, context_valid)
    index, valid = pack(kept)
    return Reduction(index, valid, gather_rows(hidden, index))
