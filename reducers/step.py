"""What a method sees at a reduction site (`Step`) and what it hands back (`Reduction`).

The runtime builds a Step wherever a method acts (after a vision-tower layer, or before an LLM layer),
with the candidate tokens of every row laid out as a padded [N, V] index into the sequence. Methods
work entirely in that candidate space; gathering, masks, positions and caches stay in the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .rows import gather_rows


@dataclass
class Step:
    """A batch of N sequences (image crops in the tower, prompts in the LLM) at one reduction site.

    At a decode-time site (KV eviction) there are no hidden states or queries: `hidden`, `q`, `k` are None
    and `received` holds the attention the decode queries have paid each candidate entry so far.
    """
    hidden: Tensor | None   # [N, S, D] hidden states entering the site
    q: Tensor | None        # [N, H, S, d] queries of the layer whose attention scores the tokens (rotated in the LLM)
    k: Tensor | None        # [N, Hkv, S, d] its keys
    key_valid: Tensor       # [N, S] real tokens (False: padding)
    cand: Tensor            # [N, V] sequence positions of the candidate (visual) tokens, in sequence order
    cand_valid: Tensor      # [N, V] False where a row has fewer candidates than V
    keep: Tensor            # [N] candidates to keep after this step
    causal: bool            # LLM attention is causal; the vision tower's is not
    text: Tensor | None = None      # [N, S] LLM only: real, non-visual tokens
    grid: tuple[int, int] | None = None  # vision only: the patch grid (h, w)
    slots: Tensor | None = None     # [N, V] vision only: each candidate's patch index on that grid
    layer: int = 0          # the site's layer index (vision layer j, or LLM layer K)
    received: Tensor | None = None  # [N, V] decode sites: accumulated attention from the decode queries
    lse: Tensor | None = None       # [N, H, S] each query row's log-sum-exp per head: from the site layer's own SDPA
                                    # kernel where the runtime has it, else filled on first use (scores.row_logsumexp)

    @property
    def hidden_cand(self) -> Tensor:
        """[N, V, D] the candidates' hidden states."""
        return gather_rows(self.hidden, self.cand)

    def cand_at(self, index: Tensor) -> Tensor:
        """[N, K] the sequence positions of the candidates at candidate indices `index` [N, K]."""
        return self.cand.gather(1, index)

    def hidden_of(self, index: Tensor) -> Tensor:
        """[N, K, D] the hidden states of the candidates at candidate indices `index` [N, K] (a fresh copy)."""
        return gather_rows(self.hidden, self.cand_at(index))


@dataclass
class Reduction:
    """The candidates a method keeps, by candidate index in ascending (sequence) order, and their new states."""
    kept: Tensor            # [N, K] candidate indices, ascending; padded entries have kept_valid False
    kept_valid: Tensor      # [N, K]
    hidden: Tensor | None = None  # [N, K, D] updated states of the kept candidates (merges); None: unchanged
