"""random (floor baseline): keep a uniformly random, seeded subset of patches, early in the vision tower.

Every crop uses the same seeded draw, so a row's result never depends on its batch neighbours.
"""
import torch

from ..stages import split
from ..step import Reduction, Step
from . import Method, register


@register("random")
class RandomSelection(Method):
    seed: int = 0
    vision_share: float = 1.0

    def vision_sites(self, shape):
        return [0]

    def reduce_vision(self, step: Step) -> Reduction:
        scores = torch.stack([torch.rand(step.cand.shape[1], generator=torch.Generator().manual_seed(self.seed))
                              for _ in range(step.cand.shape[0])]).to(step.cand.device)
        return split(step, scores).reduction()
