"""FastV (baseline): at LLM layer K keep the visual tokens the last prompt token attends to most.

Scores are the head-averaged attention of the last token at layer K-1; kept tokens keep their original
positions. Default K = 2 of 32 layers (the authors' setting), scaled to the model's depth.
"""
from ..scores import last_token_attention
from ..stages import split
from ..step import Reduction, Step
from . import Method, register


@register("fastv")
class FastV(Method):
    layer: float = 2 / 32  # relative depth of the pruning layer K

    def llm_sites(self, shape):
        return [shape.llm_layer(self.layer)]

    def reduce_llm(self, step: Step) -> Reduction:
        return split(step, last_token_attention(step)).reduction()
