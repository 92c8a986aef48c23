"""FiCoCo-VL: FiCoCo-V in the tower, then FiCoCo-L in the LLM, sharing one budget.

No public code exists; our split: the tower does `vision_share` (default half) of the reduction
full -> budget, so it hands the LLM full - share * (full - budget) tokens, and FiCoCo-L at layer K prunes
further so that the layer average meets the budget.
"""
from dataclasses import field

from ..step import Reduction, Step
from . import Method, register
from .ficoco_l import FiCoCoL
from .ficoco_v import FiCoCoV


@register("ficoco-vl")
class FiCoCoVL(Method):
    vision_share: float = 0.5
    vision: FiCoCoV = field(default_factory=FiCoCoV)  # the tower half's hyperparameters
    llm: FiCoCoL = field(default_factory=FiCoCoL)     # the LLM half's hyperparameters

    def vision_sites(self, shape):
        return self.vision.vision_sites(shape)

    def llm_sites(self, shape):
        return self.llm.llm_sites(shape)

    def reduce_vision(self, step: Step) -> Reduction:
        return self.vision.reduce_vision(step)

    def reduce_llm(self, step: Step) -> Reduction:
        return self.llm.reduce_llm(step)
