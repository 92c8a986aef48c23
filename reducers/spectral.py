"""Information scores from the singular structure of hidden states (TokenCarve's IPGS), per row, in fp32.

For one row's visual hidden states X [V, D] with SVD X = U S V^T, token i's information contribution is
||(U S)_i||_1 = sum_j s_j |u_ij|. Since U S = X V, only the right singular directions are needed, and the top ones
carry most of the sum: `top_directions` finds the leading r of them by subspace iteration (a few [V, D] x [D, r]
products, QR of [D, r], and one SVD of the [V, r] projection). When r reaches the rank of X the subspace is all of
X's row space and the score is exactly the full-SVD one; below that it drops the smallest singular directions.
A full SVD of [576, 4096] per row costs far more than the prefill saves on CPU (see the README), hence this route.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .stages import gather_rows


def top_directions(x: Tensor, directions: int, power_steps: int) -> Tensor:
    """Orthonormal bases [N, D, r] of the leading right singular subspaces of x [N, V, D], r = min(directions, V, D)."""
    r = min(directions, x.shape[1], x.shape[2])
    # start from the r longest rows: they already point mostly along the dominant directions
    longest = torch.topk(x.norm(dim=-1), r, dim=1).indices  # [N, r]
    basis = torch.linalg.qr(gather_rows(x, longest).transpose(1, 2)).Q  # [N, D, r]
    for _ in range(power_steps):
        basis = torch.linalg.qr(x.transpose(1, 2) @ (x @ basis)).Q
    return basis


def information_score(hidden: Tensor, valid: Tensor, directions: int, power_steps: int) -> Tensor:
    """||(U S)_i||_1 over the leading `directions` singular directions of each row's valid states: [N, V] (padding 0).

    hidden [N, V, D]; the SVD is taken per row of the fp32 states with padding rows zeroed (they add nothing to it).
    """
    x = hidden.float() * valid[..., None]
    projected = x @ top_directions(x, directions, power_steps)  # [N, V, r] = U S in a rotated basis of the subspace
    u, s, _ = torch.linalg.svd(projected, full_matrices=False)  # rotate onto the singular directions themselves
    return (u * s[:, None, :]).abs().sum(-1) * valid
