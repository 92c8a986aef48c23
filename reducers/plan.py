"""The budget plan: from (model shape, method, budget) to the visual-token counts at every tower and LLM layer.

`plan` is the one place a budget becomes counts and is checked against what the method can reach: `validate` and
`schedule` run it on one nominal image, the runtime on the images of each batch (LLM counts per prompt row, which
may hold several images), and the accounting prices `schedule`'s counts. The arithmetic itself is in budget.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .budget import BudgetError, Setting, linear_steps, llm_counts, resolve, vision_target
from .methods import Method
from .shape import ModelShape


@dataclass(frozen=True)
class Plan:
    """Visual-token counts of one batch of images under one method and budget (I images in B prompt rows)."""
    full: Tensor            # [I] full visual-token count of each image
    budget: Tensor          # [I] layer-averaged budget N of each image
    entering: Tensor        # [I] visual tokens each image hands the LLM (what the tower leaves)
    row_budget: Tensor      # [B] budgets summed per prompt row
    row_entering: Tensor    # [B] visual tokens entering the LLM per row
    vision_sites: list[int]  # tower layers after which the method shortens the crops
    llm_sites: list[int]    # LLM layers before which it prunes
    llm_keep: list[Tensor]  # per LLM site, [B] visual tokens each row keeps from there on

    def visual_per_layer(self, llm_layers: int) -> Tensor:
        """[L, B] visual tokens each LLM layer processes in prefill."""
        counts = self.row_entering.expand(llm_layers, -1).clone()
        for site, keep in zip(self.llm_sites, self.llm_keep):
            counts[site:] = keep
        return counts


def image_budgets(method: Method, full: Tensor, visual_tokens: int | None,
                  ratio: float | None) -> tuple[Tensor, Tensor]:
    """Per image [I]: the layer-averaged budget N and the visual tokens the tower hands the LLM. A method that takes
    no budget (`none`) keeps everything."""
    budget = resolve(full, visual_tokens, ratio) if method.takes_budget else full.clone()
    return budget, vision_target(full, budget, method.vision_share)


def plan(shape: ModelShape, method: Method, full: Tensor, visual_tokens: int | None, ratio: float | None,
         image_row: Tensor | None = None, rows: int | None = None) -> Plan:
    """The plan for images of full counts `full` [I], image i in prompt row `image_row[i]` of `rows` (default: one
    image a row). Raises BudgetError where a budget is above an image's full count or below what the method can
    reach in a row."""
    image_row = torch.arange(len(full)) if image_row is None else image_row
    rows = len(full) if rows is None else rows

    def per_row(per_image: Tensor) -> Tensor:  # [I] -> [B]
        return torch.zeros(rows, dtype=torch.long).index_add_(0, image_row, per_image)

    budget, entering = image_budgets(method, full, visual_tokens, ratio)
    row_budget, row_entering = per_row(budget), per_row(entering)
    llm_sites = method.llm_sites(shape)
    keep = []
    if llm_sites:
        _check_reachable(method, shape, per_row(full), row_entering, row_budget, visual_tokens, ratio)
        keep = llm_counts(row_entering, row_budget, llm_sites, shape.llm_layers)
    return Plan(full=full, budget=budget, entering=entering, row_budget=row_budget, row_entering=row_entering,
                vision_sites=method.vision_sites(shape) if method.vision_share > 0 else [], llm_sites=llm_sites,
                llm_keep=keep)


def tower_counts(shape: ModelShape, plan_: Plan) -> list[int]:
    """[Lv] tokens (CLS included) entering each tower layer for the first image, taken as one crop."""
    counts = [shape.patches + 1] * shape.vision_layers
    steps = linear_steps(plan_.full[:1], plan_.entering[:1], len(plan_.vision_sites))
    for site, count in zip(plan_.vision_sites, steps):
        counts[site + 1:] = [int(count) + 1] * (shape.vision_layers - site - 1)
    return counts


def _check_reachable(method: Method, shape: ModelShape, row_full: Tensor, row_entering: Tensor, row_budget: Tensor,
                     visual_tokens: int | None, ratio: float | None) -> None:
    """An LLM-side method pruning first at layer K of L cannot average below K/L of the tokens entering the LLM."""
    first, layers = method.llm_sites(shape)[0], shape.llm_layers
    short = row_budget * layers < first * row_entering
    if not short.any():
        return
    row = int(short.nonzero()[0])
    full = int(row_full[row])
    # the smallest budget whose tokens entering the LLM it can meet (the tower's share shrinks them with the budget)
    candidates = torch.arange(1, full + 1)
    reachable = candidates * layers >= first * vision_target(torch.full_like(candidates, full), candidates,
                                                             method.vision_share)
    smallest = int(candidates[reachable][0])
    smallest_ratio = math.ceil(smallest / full * 1000) / 1000  # rounded up, so that it still reaches `smallest`
    given = Setting("visual_tokens", visual_tokens) if visual_tokens is not None else Setting("ratio", ratio)
    raise BudgetError(f"{method.name} prunes first at LLM layer {first} of {layers}: with these parameters the "
                      f"smallest budget it can meet is {smallest} of {full} visual tokens (",
                      Setting("visual_tokens", smallest), " or ", Setting("ratio", smallest_ratio), "); asked ",
                      given, "" if visual_tokens is not None else f" = {int(row_budget[row])} tokens",
                      ". Raise the budget (or, from Python, give the method an earlier pruning layer).")
