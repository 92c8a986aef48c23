"""TokenCarve (seed 002): information-preserving selection, then similarity-guided merging, at LLM layer K.

X are the hidden states entering layer K (the output of layer K-1) over each row's visual span; attention is read
at layer K-1 from the last prompt token (head mean), which under causal attention sees every visual token.
  select  info_i = ||(U S)_i||_1 from X = U S V^T (reducers.spectral); attn_i = the last token's attention to i.
          Each ranking gives weights n, n-1, ..., 1; fused = info_weight * w_info + (1 - info_weight) * w_attn;
          keep the top `select` x T (T: the site's keep count).
  merge   those n split by fused rank into A (the top n // 2: the authors' int(0.5 * n), ShawnTan86/TokenCarve
          modeling_llama.py) and B; each B token finds its most cosine-similar A token and the (select - 1) x T most
          similar B tokens are averaged into their A partner: T remain.
Kept tokens keep their original positions. The caches of layers < K are cut to the kept tokens too (the authors do;
`prune_cache_before`); a merged A token keeps its own earlier-layer entries. Default K = 2 of 32 (the authors';
their advice is 0.1-0.3 x depth for short answers, later for long generation).
"""
import torch

from ..scores import last_token_attention
from ..spectral import information_score
from ..rows import gather_rows, pack, scatter_rows, unpack
from ..stages import merge_most_similar, rank_weights, split
from ..step import Reduction, Step
from . import Method, register


@register("tokencarve")
class TokenCarve(Method):
    layer: float = 2 / 32            # relative depth of the pruning layer K
    select: float = 1.5              # the selection keeps select x T tokens before merging back down to T
    info_weight: float = 0.5         # weight of the information ranking in the fusion (attention gets the rest)
    fp64_eigh: bool = False          # information score's eigendecomposition in fp64: exact also on states with one
                                     # dominant direction, ~1.5x its cost (reducers.spectral, docs/reducers.md)
    prune_cache_before: bool = True  # cut the caches of layers < K to the kept tokens as well

    def __post_init__(self):
        if not 1 <= self.select <= 2:
            raise ValueError(f"tokencarve: select must be in [1, 2] (merging halves at most the selection), got {self.select}")
        if not 0 <= self.info_weight <= 1:
            raise ValueError(f"tokencarve: info_weight must be in [0, 1], got {self.info_weight}")

    def llm_sites(self, shape):
        return [shape.llm_layer(self.layer)]

    def reduce_llm(self, step: Step) -> Reduction:
        valid, hidden = step.cand_valid, step.hidden_cand  # [N, V], [N, V, D]
        width = valid.shape[1]
        info = information_score(hidden, valid, torch.float64 if self.fp64_eigh else torch.float32)
        fused = (self.info_weight * rank_weights(info, valid)
                 + (1 - self.info_weight) * rank_weights(last_token_attention(step), valid))
        selected = torch.minimum(step.keep + torch.floor((self.select - 1) * step.keep).long(), valid.sum(1))  # [N]
        top = split(step, fused, keep=selected // 2)  # A: int(0.5 * selected), as the authors do
        top_mask = unpack(top.kept, top.kept_valid, width)
        chosen = split(step, fused, keep=selected)
        rest, rest_valid = pack(unpack(chosen.kept, chosen.kept_valid, width) & ~top_mask)  # B
        merged, absorbed = merge_most_similar(hidden, top.kept, top.kept_valid, rest, rest_valid, selected - step.keep)
        kept, kept_valid = pack(top_mask | unpack(rest, rest_valid & ~absorbed, width))
        states = scatter_rows(hidden, top.kept, merged, top.kept_valid)  # [N, V, D] with A's merged states
        return Reduction(kept, kept_valid, gather_rows(states, kept))
