"""FiCoCo-L (seeds 000/003): filter-correlate-compress once, at LLM layer K, on each row's visual span.

Attention is read at layer K-1 (causal). A[i, j] is how much query i attends to key j:
  filter     s_i = beta * mean_{j in visual} A[i, j] - (1 - beta) * mean_{k in text} A[k, i]
             (visual token i attending to other visual tokens, minus the text attending to i); discard the highest s
  correlate  C_ij = gamma * A[i, j] + (1 - gamma) * mean_{k in text} A[k, i] * A[k, j]
             (direct, plus via the text rows that see both: a visual token cannot attend to later text)
  compress   the self-preserving average, with its denominator.
The text rows are the prompt tokens after the image. Default K = the 4th layer (index 3 of 32).
"""
from ..scores import attention_block, candidate_mean, masked_mean, text_rows
from ..rows import gather_rows
from ..stages import merge_self_preserving_, quantile_targets, split
from ..step import Reduction, Step
from . import Method, register


@register("ficoco-l")
class FiCoCoL(Method):
    layer: float = 3 / 32    # relative depth of K
    beta: float = 0.6
    gamma: float = 0.6
    eps: float = 0.998

    def llm_sites(self, shape):
        return [shape.llm_layer(self.layer)]

    def reduce_llm(self, step: Step) -> Reduction:
        rows, text_valid = text_rows(step)
        text = attention_block(step, rows, step.cand) * (text_valid[..., None] & step.cand_valid[:, None])  # [N, T, V]
        attended = masked_mean(text, text_valid[..., None], 1)  # [N, V]
        redundancy = self.beta * candidate_mean(step) - (1 - self.beta) * attended
        parts = split(step, -redundancy)
        seen = text.transpose(1, 2)  # [N, V, T]: how each text row attends to each visual token
        via_text = gather_rows(seen, parts.dropped) @ gather_rows(seen, parts.kept).transpose(1, 2)  # [N, R, K]
        via_text = via_text / text_valid.sum(1).clamp(min=1)[:, None, None]
        direct = attention_block(step, step.cand_at(parts.dropped), step.cand_at(parts.kept))  # [N, R, K]
        corr = self.gamma * direct + (1 - self.gamma) * via_text
        alpha = quantile_targets(corr, parts, self.eps)
        return parts.reduction(merge_self_preserving_(step.hidden_of(parts.kept), step.hidden_of(parts.dropped), alpha))
