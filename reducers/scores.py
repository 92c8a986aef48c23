"""Attention-derived token scores, computed from captured q / k, in fp32, one key/value head at a time.

The model's own attention stays SDPA (no attention weights come out of it); a site asks only for the
rows it needs (CLS, the last text token, the candidates, the text) and gets head-averaged softmax
probabilities A[row, key] over the keys that row may attend to (real tokens; causal in the LLM).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .stages import pack
from .step import Step


def attention_rows(step: Step, rows: Tensor) -> Tensor:
    """A for query rows `rows` [N, R] (sequence positions) against all keys: [N, R, S], head-averaged."""
    n, h, s, d = step.q.shape
    q = step.q.gather(2, rows[:, None, :, None].expand(-1, h, -1, d))  # [N, H, R, d]
    allowed = step.key_valid[:, None, :].expand(-1, rows.shape[1], -1)  # [N, R, S]
    if step.causal:
        allowed = allowed & (torch.arange(s, device=rows.device) <= rows[..., None])
    return query_attention(q, step.k, allowed)


def query_attention(q: Tensor, k: Tensor, allowed: Tensor) -> Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) over the allowed keys: q [N, H, R, d], k [N, Hkv, S, d],
    allowed [N, R, S] -> [N, R, S]. Rows with no allowed key (padding) get zeros."""
    n, h, r, d = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    group = h // h_kv  # grouped-query attention: `group` query heads share one key head
    q = q.float() * d ** -0.5
    total = torch.zeros(n, r, s, device=q.device)
    for kv_head in range(h_kv):
        logits = q[:, kv_head * group:(kv_head + 1) * group] @ k[:, kv_head, None].float().transpose(-1, -2)
        total += torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num_(0.0).sum(1)
    return total / h


def candidate_columns(attn: Tensor, step: Step) -> Tensor:
    """Restrict A [N, R, S] to the candidate columns: [N, R, V] (zero at padded candidates)."""
    cols = attn.gather(2, step.cand[:, None, :].expand(-1, attn.shape[1], -1))
    return cols * step.cand_valid[:, None, :]


def cls_attention(step: Step) -> Tensor:
    """How much CLS (position 0 of a vision crop) attends to each candidate patch: [N, V]."""
    rows = torch.zeros(step.cand.shape[0], 1, dtype=torch.long, device=step.cand.device)
    return candidate_columns(attention_rows(step, rows), step)[:, 0]


def last_token_attention(step: Step) -> Tensor:
    """How much the last prompt token attends to each visual candidate: [N, V] (LLM, left-padded)."""
    s = step.hidden.shape[1]
    rows = torch.full((step.cand.shape[0], 1), s - 1, dtype=torch.long, device=step.cand.device)
    return candidate_columns(attention_rows(step, rows), step)[:, 0]


def candidate_attention(step: Step) -> Tensor:
    """A among candidates: [N, V, V], row i = how candidate i attends to candidate j (causal in the LLM)."""
    return candidate_columns(attention_rows(step, step.cand), step) * step.cand_valid[..., None]


def text_rows(step: Step) -> tuple[Tensor, Tensor]:
    """The text tokens after each row's first visual token (the ones that can see the image): [N, T] + valid."""
    first_visual = step.cand[:, :1]  # [N, 1]
    after = step.text & (torch.arange(step.text.shape[1], device=step.cand.device) > first_visual)
    return pack(after)


def text_attention(step: Step) -> tuple[Tensor, Tensor]:
    """A from the text rows that follow the image to the candidates: [N, T, V], and the rows' validity [N, T]."""
    rows, valid = text_rows(step)
    return candidate_columns(attention_rows(step, rows), step) * valid[..., None], valid


def masked_mean(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Mean of x over `dim`, counting only entries where `valid` (broadcastable to x)."""
    valid = valid.to(x.dtype).expand_as(x)
    return (x * valid).sum(dim) / valid.sum(dim).clamp(min=1)
