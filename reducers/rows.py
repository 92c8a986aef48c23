"""Row-wise index helpers: every tensor is a batch of rows [N, S, ...] (prompts or image crops), and each row picks
its own entries by per-row indices [N, K] with a validity mask, so rows never influence each other."""
from __future__ import annotations

import torch
from torch import Tensor


def pack(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the True entries of each row, ascending, padded to the longest row: [N, K] + validity."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    width = int(mask.sum(1).max()) if mask.numel() else 0
    return order[:, :width], mask.gather(1, order[:, :width])


def unpack(index: Tensor, valid: Tensor, width: int) -> Tensor:
    """The inverse of `pack`: a [N, width] mask, True at the valid per-row indices [N, K]."""
    mask = torch.zeros(index.shape[0], width + 1, dtype=torch.bool, device=index.device)
    return mask.scatter_(1, index.masked_fill(~valid, width), True)[:, :width]  # padding lands in a spare column


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x [N, V, ...] at per-row indices [N, K] -> [N, K, ...]."""
    n, v = index.shape[0], x.shape[1]
    flat = index + v * torch.arange(n, device=index.device)[:, None]  # whole rows copy far faster than `gather`
    return x.reshape(n * v, *x.shape[2:]).index_select(0, flat.view(-1)).view(*index.shape, *x.shape[2:])


def scatter_rows(base: Tensor, index: Tensor, values: Tensor, valid: Tensor) -> Tensor:
    """base [N, S, ...] with values [N, K, ...] written at per-row indices [N, K] where `valid`, others untouched.

    Padded entries write into a spare row that is cut off, so they can never overwrite a real write.
    """
    n, spare = base.shape[:2]
    buffer = torch.cat([base, base[:, :1]], 1)
    flat = index.masked_fill(~valid, spare) + (spare + 1) * torch.arange(n, device=index.device)[:, None]
    buffer.view(n * (spare + 1), *base.shape[2:]).index_copy_(0, flat.view(-1), values.reshape(-1, *base.shape[2:]))
    return buffer[:, :spare]


def pack_right(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of each row's kept entries, in order, right-aligned (left padding): [B, W] + validity."""
    order = torch.argsort(keep.to(torch.int8), dim=1, stable=True)
    width = int(keep.sum(1).max())
    index = order[:, order.shape[1] - width:]
    return index, keep.gather(1, index)
