"""ST^3 (seed 001): progressive visual-token pruning in prefill (PVTP) and visual-token annealing in decoding (VTA).

Only the paper's abstract is public; this design is ours (methods.md):
  PVTP  before each pruning layer (default every 4th layer from layer 2, relative to depth) the remaining visual
        tokens are ranked by the attention the last prompt token pays them at the layer before, and the least
        attended are removed for good. The counts follow reducers.budget.llm_counts: each pruning layer keeps the
        same fraction rho of the visual tokens it receives, rho solved per image so that the layer-averaged count
        meets the budget (the keep fraction is therefore set by the budget and the pruning layers, not a free knob).
  VTA   during decoding, at step t each layer l may hold n_l(t) = round(n_l(0) * a(t)) visual KV entries, n_l(0) the
        entries it held after prefill and a(t) = max(floor, 1 - (1 - floor) * t / anneal_steps): linear from 1 to
        `floor`, reached at step `anneal_steps`, constant after. The entries the decode queries have attended least
        so far (head-averaged attention accumulated over the steps) are evicted for good.
At the full budget nothing is pruned in prefill, and VTA switches itself off too (a row whose prefill removed no
visual token keeps every entry), so the method reproduces the unreduced model exactly. `vta=False` is PVTP alone.
"""
import torch
from torch import Tensor

from ..scores import last_token_attention
from ..stages import split
from ..step import Reduction, Step
from . import Method, register


@register("st3")
class ST3(Method):
    first_layer: float = 2 / 32    # relative depth of the first pruning layer
    every: float = 4 / 32          # relative distance between pruning layers (every 4th of 32)
    vta: bool = True               # anneal the visual KV entries during decoding
    anneal_steps: int = 64         # decode steps over which a(t) falls linearly from 1 to `floor`
    floor: float = 0.25            # the share of each layer's visual entries VTA keeps in the end

    def __post_init__(self):
        if not (0 < self.first_layer < 1 and 0 < self.every < 1):
            raise ValueError(f"st3: first_layer and every are relative depths in (0, 1), got {self.first_layer}, {self.every}")
        if self.anneal_steps < 1 or not 0 < self.floor <= 1:
            raise ValueError(f"st3: anneal_steps must be >= 1 and floor in (0, 1], got {self.anneal_steps}, {self.floor}")

    def llm_sites(self, shape):
        count = int((1 - self.first_layer) / self.every - 1e-9) + 1  # pruning depths first + i * every < 1
        return sorted({shape.llm_layer(self.first_layer + i * self.every) for i in range(count)})

    def reduce_llm(self, step: Step) -> Reduction:
        return split(step, last_token_attention(step)).reduction()

    def annealing(self, step: int) -> float:
        """a(t): the share of its post-prefill visual entries a layer may hold at decode step t."""
        return max(self.floor, 1 - (1 - self.floor) * step / self.anneal_steps)

    def decode_keep(self, step: int, after_prefill: Tensor) -> Tensor | None:
        if not self.vta:
            return None
        pruned = after_prefill[-1] < after_prefill[0]  # [B] rows whose prefill removed visual tokens (budget < full)
        annealed = torch.round(after_prefill.double() * self.annealing(step)).long()  # [L, B]
        return torch.where(pruned, annealed, after_prefill)

    def reduce_decode(self, step: Step) -> Reduction:
        return split(step, step.received).reduction()
