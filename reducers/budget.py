"""Budgets: what `visual_tokens=N` / `ratio=r` mean, turned into keep counts at each reduction site.

N is the layer-averaged number of visual tokens the LLM processes during prefill: the LLM prefill costs
what it would cost with N visual tokens at every layer. A vision-side method therefore feeds exactly N
tokens to the LLM; a method pruning at LLM layer K keeps fewer than N after K so the average is N.
All counts here are per image (or per row) tensors, since LLaVA-NeXT images have different full counts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class Setting:
    """A budget setting named in an error message, with the value to show beside it."""
    name: str      # the keyword of attach / validate: visual_tokens or ratio
    value: object  # what was asked, or a placeholder such as "N"


def keyword(setting: Setting) -> str:
    """A setting as Python's attach / validate spell it: visual_tokens=64."""
    return f"{setting.name}={setting.value}"


class BudgetError(ValueError):
    """A refused budget. The message is kept as text and settings, so a front end can name the settings its own
    way (the command line: --visual-tokens 64); str() names them as the keywords of attach / validate."""

    def __init__(self, *parts: str | Setting):
        self.parts = parts
        super().__init__(self.render(keyword))

    def render(self, spell: Callable[[Setting], str]) -> str:
        """The message with every setting spelled by `spell`."""
        return "".join(spell(part) if isinstance(part, Setting) else part for part in self.parts)


def check_budget(visual_tokens: int | None, ratio: float | None) -> None:
    """Exactly one of the two budget forms, each in range (the full count is checked where it is known)."""
    if (visual_tokens is None) == (ratio is None):
        raise BudgetError("give exactly one budget: ", Setting("visual_tokens", "N"), " (layer-averaged visual "
                          "tokens in the LLM) or ", Setting("ratio", "R"), " (N = round(R x full count) per image)")
    if visual_tokens is not None and (not isinstance(visual_tokens, int) or visual_tokens < 1):
        raise BudgetError("the budget ", Setting("visual_tokens", repr(visual_tokens)), " is not a positive integer")
    if ratio is not None and not 0.0 < float(ratio) <= 1.0:
        raise BudgetError("the budget ", Setting("ratio", repr(ratio)), " is not in (0, 1]")


def resolve(full: Tensor, visual_tokens: int | None, ratio: float | None) -> Tensor:
    """Per-image budget N from the per-image full visual count `full` [I]."""
    if ratio is not None:
        return torch.round(full.double() * float(ratio)).long().clamp(min=1)
    budget = torch.full_like(full, visual_tokens)
    if (budget > full).any():
        raise BudgetError(Setting("visual_tokens", visual_tokens), " is above the full visual-token count of an "
                          f"image ({int(full.min())}); use at most that, or ", Setting("ratio", "R"))
    return budget


def vision_target(full: Tensor, budget: Tensor, vision_share: float) -> Tensor:
    """Tokens leaving the vision tower when it does `vision_share` of the reduction full -> budget."""
    return full - torch.round((full - budget).double() * vision_share).long()


def linear_steps(start: Tensor, end: Tensor, n_sites: int) -> list[Tensor]:
    """Counts after each of `n_sites` equal removal steps from `start` down to `end` (exactly `end` last)."""
    return [start - torch.div((start - end) * (i + 1), n_sites, rounding_mode="floor") for i in range(n_sites)]


def llm_counts(entering: Tensor, budget: Tensor, prune_layers: list[int], n_layers: int) -> list[Tensor]:
    """Visual tokens kept after each LLM pruning layer so that the layer average equals `budget`.

    Layers before prune_layers[0] see `entering`; the segment starting at prune_layers[i] sees
    n_i = entering * rho^(i+1), one rho per image solved so the average meets the budget (a single
    pruning layer K gives the closed form n = (N*L - K*E) / (L - K)).
    """
    bounds = prune_layers + [n_layers]
    spans = torch.tensor([bounds[i + 1] - bounds[i] for i in range(len(prune_layers))], dtype=torch.float64)
    e, n = entering.double(), budget.double()
    lo, hi = torch.zeros_like(e), torch.ones_like(e)
    for _ in range(60):  # bisection on rho in [0, 1]; the average grows monotonically with rho
        rho = (lo + hi) / 2
        avg = (prune_layers[0] * e + (spans * rho[:, None] ** torch.arange(1, len(spans) + 1)).sum(-1) * e) / n_layers
        lo, hi = torch.where(avg < n, rho, lo), torch.where(avg < n, hi, rho)
    rho = (lo + hi) / 2
    counts = [torch.round(e * rho ** (i + 1)).long() for i in range(len(prune_layers))]
    return [torch.minimum(c, entering) for c in counts]


def split_by_weight(total: Tensor, weights: Tensor, groups: Tensor) -> Tensor:
    """Split each group's `total` [G] over its members in proportion to `weights` [M] (largest remainder).

    `groups` [M] names each member's group. Used to share an image's kept patches among its crops.
    """
    group_weight = torch.zeros(total.shape[0], dtype=torch.float64).index_add_(0, groups, weights.double())
    exact = total[groups].double() * weights.double() / group_weight[groups].clamp(min=1)
    share = exact.floor().long()
    missing = total - torch.zeros_like(total).index_add_(0, groups, share)
    # hand the remaining units to the members with the largest fractional parts, group by group
    order = torch.argsort(-(exact - share) + groups.double() * 4, stable=True)
    rank_in_group = torch.empty_like(order)
    rank_in_group[order] = torch.arange(len(order)) - torch.searchsorted(groups[order].contiguous(), groups[order].contiguous())
    return share + (rank_in_group < missing[groups]).long()
