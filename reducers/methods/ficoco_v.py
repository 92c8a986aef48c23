"""FiCoCo-V (seeds 000/003): filter-correlate-compress inside the CLIP vision tower.

From the middle of the tower to the feature layer, each layer removes a share of the patches:
  filter     s_i = lam * mean_j A_ij - (1 - lam) * A_cls,i, with the 2x2 local penalty; discard the highest s
  correlate  C_ij = A_ij; discarded i targets the kept j with C_ij >= the eps-quantile of its row
  compress   self-preserving average: x_j <- (x_j + sum_i a_ij x_i) / (1 + sum_i a_ij)
Kept patches stay in spatial order and CLS stays first (the runtime keeps it out of the candidates).
"""
from ..scores import attention_block, candidate_mean, cls_row
from ..stages import local_penalty, merge_self_preserving_, quantile_targets, split
from ..step import Reduction, Step
from . import Method, register


@register("ficoco-v")
class FiCoCoV(Method):
    lam: float = 0.35        # weight of the patch-to-patch term (the paper's lambda)
    eps: float = 0.998       # quantile of a discarded token's correlations that makes a target
    start: float = 0.5       # relative tower depth of the first reduction layer (12th of 24 in CLIP ViT-L)
    penalty: float = 2.0     # local penalty factor on each 2x2 window's maximum
    vision_share: float = 1.0

    def vision_sites(self, shape):
        return list(range(shape.vision_layer(self.start), shape.feature_layers))

    def reduce_vision(self, step: Step) -> Reduction:
        cls = attention_block(step, cls_row(step), step.cand)[:, 0]  # [N, V] CLS -> patches
        redundancy = self.lam * candidate_mean(step) - (1 - self.lam) * cls
        parts = split(step, -local_penalty(redundancy, step, self.penalty))
        corr = attention_block(step, step.cand_at(parts.dropped), step.cand_at(parts.kept))  # [N, R, K]
        alpha = quantile_targets(corr, parts, self.eps)
        return parts.reduction(merge_self_preserving_(step.hidden_of(parts.kept), step.hidden_of(parts.dropped), alpha))
