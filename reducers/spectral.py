"""Information scores from the singular structure of hidden states (TokenCarve's IPGS), per row, batched.

For one row's visual hidden states X [V, D] with SVD X = U S W^T, token i's information contribution is
||(U S)_i||_1 = sum_j s_j |u_ij|. It is computed without an SVD, from the eigendecomposition of the smaller Gram
matrix (formed in fp32): X X^T = U S^2 U^T gives U S = U sqrt(S^2) (V <= D, the LLaVA case: 576 tokens of width
2048-4096), and X^T X = W S^2 W^T gives U S = X W (D < V). Signs and the order of the directions do not matter under
|.| and the sum, so in exact arithmetic this is the SVD's score; it costs a fraction of `torch.linalg.svd` of [V, D].

Precision: `eigh` rounds at eps * (largest eigenvalue), and the eigenvectors of the other directions mix by that
over their spacing. Hidden states whose largest direction dominates (a component shared by all tokens, which LLM
states carry) therefore lose agreement with the SVD in fp32 long before they do in fp64; docs/reducers.md gives numbers.
"""
from __future__ import annotations

import torch
from torch import Tensor


def information_score(hidden: Tensor, valid: Tensor, eigh_dtype: torch.dtype = torch.float32) -> Tensor:
    """||(U S)_i||_1 of each row's valid states X = U S W^T: [N, V] (padding 0).

    hidden [N, V, D]; padding rows are zeroed first, so they add nothing to X's singular structure. The Gram matrix
    is formed in fp32 and decomposed in `eigh_dtype`.
    """
    x = hidden.float() * valid[..., None]  # [N, V, D]
    if x.shape[1] <= x.shape[2]:
        squares, left = torch.linalg.eigh((x @ x.transpose(1, 2)).to(eigh_dtype))  # [N, V], [N, V, V]
        scaled = left * squares.clamp(min=0).sqrt()[:, None, :]  # rounding can leave null directions slightly < 0
    else:
        scaled = x @ torch.linalg.eigh((x.transpose(1, 2) @ x).to(eigh_dtype)).eigenvectors.float()  # [N, V, D]
    return scaled.float().abs().sum(-1) * valid
