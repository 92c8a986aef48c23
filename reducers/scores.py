"""Attention-derived token scores, computed from captured q / k in cache-sized blocks of query rows (fp32 softmax).

The model's own attention stays SDPA (no attention weights come out of it); a site asks only for the
rows it needs (CLS, the last text token, the candidates, the text) and gets head-averaged softmax
probabilities A[row, key] over the keys that row may attend to (real tokens; causal in the LLM).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .stages import pack, unpack
from .step import Step

_CHUNK = 1 << 19  # logits per batched product: small enough to stay in cache, large enough for few Python steps


def attention_rows(step: Step, rows: Tensor) -> Tensor:
    """A for query rows `rows` [N, R] (sequence positions) against all keys: [N, R, S], head-averaged."""
    n, h, s, d = step.q.shape
    flat = step.q.transpose(1, 2).reshape(n * s, h, d)  # the captured [N, S, H, d] layout: whole rows copy fast
    q = flat.index_select(0, (rows + s * torch.arange(n, device=rows.device)[:, None]).view(-1))
    q = q.view(n, -1, h, d).transpose(1, 2)  # [N, H, R, d]
    if not step.causal and bool(step.key_valid.all()):
        return query_attention(q, step.k)  # nothing to mask (a tower without ragged crops)
    allowed = step.key_valid[:, None, :].expand(-1, rows.shape[1], -1)  # [N, R, S]
    if step.causal:
        allowed = allowed & (torch.arange(s, device=rows.device) <= rows[..., None])
    return query_attention(q, step.k, allowed)


def query_attention(q: Tensor, k: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) over the allowed keys: q [N, H, R, d], k [N, Hkv, S, d],
    allowed [N, R, S] (None: every key) -> [N, R, S] fp32. Rows with no allowed key (padding) get zeros.

    A bf16 model's logits are bf16 products (fp32 accumulation, rounded once: about the rounding its q / k already
    carry), any other model's fp32; the softmax is fp32. Dense keys of the compute dtype (a KV cache) are read in
    place.
    """
    n, h, r, d = q.shape
    s = k.shape[2]
    if r * s == 0:
        return torch.zeros(n, r, s, device=q.device)
    dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    q = q.to(dtype)  # read in place: a product takes strided query rows at full speed (not strided keys)
    group = h // k.shape[1]  # grouped-query attention: `group` query heads share each key head
    k = k if k.dtype == dtype and k.is_contiguous() else _contiguous(k, dtype)  # [N, Hkv, S, d]
    blocked = None if allowed is None else ~allowed  # [N, R, S]
    rows = max(1, _CHUNK // (h * s))  # query rows per product
    blocks = _row_blocks(allowed, r, s, rows)
    batch = max(1, min(n, rows // r))  # batch rows per product: several only when each has few query rows (decoding)
    size = batch * h * max((end - top) * keys for top, end, keys in blocks)
    logits = torch.empty(size, dtype=dtype, device=q.device)
    probs = None if dtype == torch.float32 else torch.empty(size, device=q.device)  # bf16 logits' softmax in fp32
    # a key prefix is copied dense once per block: a batched product would copy a strided one itself, per head
    k_buffer = None if all(keys == s for _, _, keys in blocks) else torch.empty_like(k[:batch])
    heads = torch.full((1, h), 1 / h, device=q.device)  # the head mean as one product
    total = torch.empty(n, r, s, device=q.device) if blocks == [(0, r, s)] else torch.zeros(n, r, s, device=q.device)
    for first in range(0, n, batch):
        nb = slice(first, first + batch)
        for top, end, keys in blocks:
            shape = (min(batch, n - first), h, end - top, keys)
            part = logits[:math.prod(shape)].view(shape)  # [batch, H, rows, keys]
            rows_kv = group * (end - top)  # a key head's query heads stacked as rows
            queries = q[nb, :, top:end].reshape(-1, rows_kv, d)  # [batch * Hkv, group * rows, d]
            keys_nb = _dense(k[nb, :, :keys], k_buffer).flatten(0, 1)  # [batch * Hkv, keys, d]
            part.view(-1, rows_kv, keys).baddbmm_(queries, keys_nb.transpose(1, 2), beta=0, alpha=d ** -0.5)
            if blocked is not None:
                part.masked_fill_(blocked[nb, None, top:end, :keys], float("-inf"))
            if probs is not None:
                part = probs[:part.numel()].view(shape).copy_(part)
            _head_mean(heads, torch.softmax(part, -1, out=part), total[nb, top:end, :keys])
    if blocked is not None:
        total.nan_to_num_(0.0)  # a row with every key blocked is all NaN
    return total


def _row_blocks(allowed: Tensor | None, r: int, s: int, size: int) -> list[tuple[int, int, int]]:
    """(first row, end row, keys): blocks of `size` rows, rows [first, end) attending only among the first `keys`
    keys. Under a causal mask each block stops at its last allowed key (about half the keys overall)."""
    if allowed is None:
        width = [s] * r
    else:
        seen = allowed.any(0).cumsum(-1, dtype=torch.int32)  # [R, S]: keys allowed so far, in any batch row
        width = ((seen < seen[:, -1:]).sum(-1) + 1).tolist()  # per row: its last allowed key + 1
    return [(top, min(top + size, r), max(width[top:top + size])) for top in range(0, r, size)]


def _head_mean(weights: Tensor, probs: Tensor, out: Tensor) -> None:
    """out [B, R, K] = weights [1, H] @ probs [B, H, R, K]: the head mean as one product per batch row, which sums
    head after head in order (exactly as a chain of adds would) and reads each head once; a batched product sums
    in another order."""
    for row, row_out in zip(probs.flatten(2), out):  # [H, R * K], [R, K]
        if row_out.is_contiguous():
            torch.mm(weights, row, out=row_out.view(1, -1))
        else:
            row_out.copy_((weights @ row).view(row_out.shape))


def _dense(x: Tensor, buffer: Tensor | None) -> Tensor:
    """x as a contiguous tensor: itself if it is one, else a copy into the front of `buffer`."""
    if x.is_contiguous():
        return x
    return buffer.view(-1)[:x.numel()].view(x.shape).copy_(x)


def _contiguous(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy in `dtype`, in one pass (`.to` hands back a same-dtype tensor as it is, strides and all)."""
    return torch.empty(x.shape, dtype=dtype, device=x.device).copy_(x)


def candidate_columns(attn: Tensor, step: Step) -> Tensor:
    """Restrict A [N, R, S] to the candidate columns: [N, R, V] (zero at padded candidates)."""
    cols = attn.gather(2, step.cand[:, None, :].expand(-1, attn.shape[1], -1))
    return cols * step.cand_valid[:, None, :]


def cls_row(step: Step) -> Tensor:
    """CLS's position in each vision crop: [N, 1] (zeros)."""
    return torch.zeros_like(step.cand[:, :1])


def cls_attention(step: Step) -> Tensor:
    """How much CLS attends to each candidate patch: [N, V]."""
    return candidate_columns(attention_rows(step, cls_row(step)), step)[:, 0]


def last_token_attention(step: Step) -> Tensor:
    """How much the last prompt token attends to each visual candidate: [N, V] (LLM, left-padded)."""
    s = step.hidden.shape[1]
    rows = torch.full((step.cand.shape[0], 1), s - 1, dtype=torch.long, device=step.cand.device)
    return candidate_columns(attention_rows(step, rows), step)[:, 0]


def text_rows(step: Step) -> tuple[Tensor, Tensor]:
    """The text tokens after each row's first visual token (the ones that can see the image): [N, T] + valid."""
    first_visual = step.cand[:, :1]  # [N, 1]
    after = step.text & (torch.arange(step.text.shape[1], device=step.cand.device) > first_visual)
    return pack(after)


def candidate_rows(step: Step, extra: Tensor) -> tuple[Tensor, Tensor]:
    """In one pass over the heads: A from every candidate to every key [N, V, S], and from the `extra` rows [N, E]
    (sequence positions: CLS, text) to the candidates [N, E, V]."""
    attn = attention_rows(step, torch.cat([step.cand, extra], 1))
    v = step.cand.shape[1]
    return attn[:, :v], candidate_columns(attn[:, v:], step)


def candidate_mean(attn: Tensor, step: Step) -> Tensor:
    """Each candidate's mean attention over the (valid) candidates, from candidate rows attn [N, V, S]: [N, V]."""
    cols = unpack(step.cand, step.cand_valid, attn.shape[-1])  # [N, S]
    return (attn * cols[:, None, :]).sum(-1) / cols.sum(1, keepdim=True).clamp(min=1) * step.cand_valid


def candidate_block(attn: Tensor, step: Step, rows: Tensor, cols: Tensor) -> Tensor:
    """A[candidate rows[i], candidate cols[j]] from candidate rows attn [N, V, S]: rows [N, R], cols [N, C] -> [N, R, C]."""
    picked = attn[torch.arange(len(rows), device=rows.device)[:, None], rows]  # [N, R, S]
    return picked.gather(2, step.cand.gather(1, cols)[:, None, :].expand(-1, rows.shape[1], -1))


def masked_mean(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Mean of x over `dim`, counting only entries where `valid` (broadcastable to x)."""
    valid = valid.to(x.dtype).expand_as(x)
    return (x * valid).sum(dim) / valid.sum(dim).clamp(min=1)
