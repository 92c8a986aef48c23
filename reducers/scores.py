"""Attention-derived token scores from captured q / k (the model's own attention stays SDPA: no weights come out).

Two shapes of read: whole rows for the few query rows that need every key (`attention_rows`: CLS, the last prompt
token; head-averaged softmax in cache-sized blocks, fp32), and blocks A[rows, cols] (`attention_block`): each row's
softmax normaliser (per-head log-sum-exp; from the site layer's own SDPA kernel when the runtime has it), then the
block's logits only. Keys a row may not attend (padding; later tokens in the LLM) get 0.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .rows import pack, unpack
from .step import Step

_CHUNK = 1 << 19  # logits per batched product: small enough to stay in cache, large enough for few Python steps


def attention_rows(step: Step, rows: Tensor) -> Tensor:
    """A for query rows `rows` [N, R] (sequence positions) against all keys: [N, R, S], head-averaged."""
    q = _rows_of(step.q, rows).transpose(1, 2)  # [N, H, R, d]
    if not step.causal and bool(step.key_valid.all()):
        return query_attention(q, step.k)  # nothing to mask (a tower without ragged crops)
    return query_attention(q, step.k, _allowed(step, rows, torch.arange(step.k.shape[2], device=rows.device)[None]))


def row_logsumexp(step: Step, rows: Tensor) -> Tensor:
    """Per head, the log of the softmax normaliser of query rows `rows` [N, R]: [N, H, R] fp32.

    From the site layer's own SDPA kernel when the runtime has it (`step.lse`); else computed once for every row
    of the step (in the model's dtype, like `query_attention`) and kept in `step.lse` for the next call.
    """
    if step.lse is None:
        every = torch.arange(step.q.shape[2], device=rows.device).expand(rows.shape[0], -1)  # [N, S]
        allowed = None if not step.causal and bool(step.key_valid.all()) else _allowed(step, every, every)
        step.lse = query_logsumexp(step.q, step.k, allowed)
    return step.lse.gather(2, rows[:, None, :].expand(-1, step.lse.shape[1], -1))


def attention_block(step: Step, rows: Tensor, cols: Tensor) -> Tensor:
    """Head-averaged A[rows, cols] for query rows [N, R] and keys [N, C] (sequence positions): [N, R, C] fp32, the
    softmax probabilities with each row's normaliser from `row_logsumexp` (so no other key's logit is formed);
    0 where a row may not attend the key. Logits as in `query_attention` (bf16 products for a bf16 model)."""
    n, h, _, d = step.q.shape
    h_kv, r, c = step.k.shape[1], rows.shape[1], cols.shape[1]
    dtype = _logit_dtype(step.q)
    lse = row_logsumexp(step, rows)  # [N, H, R]
    queries, keys = _rows_of(step.q, rows), _rows_of(step.k, cols)  # [N, R, H, d], [N, C, Hkv, d]
    out = torch.empty(n, r, c, device=rows.device)
    chunk = max(1, _CHUNK // max(1, h * c))  # query rows per product
    for i in range(n):  # row by row: a row's result never depends on another's
        k_i = _contiguous(keys[i].transpose(0, 1), dtype)  # [Hkv, C, d]: dense operands multiply several times faster
        for top in range(0, r, chunk):
            q_i = queries[i, top:top + chunk]  # [r', H, d]
            rows_i = q_i.shape[0]
            q_i = _contiguous(q_i.view(rows_i, h_kv, -1, d).permute(1, 2, 0, 3), dtype)  # [Hkv, group, r', d]
            logits = torch.baddbmm(torch.empty((), dtype=dtype, device=rows.device), q_i.view(h_kv, -1, d),
                                   k_i.transpose(1, 2), beta=0, alpha=d ** -0.5)  # [Hkv, group * r', C]
            probs = logits.view(h, rows_i, c).float().sub_(lse[i, :, top:top + chunk, None]).exp_()
            torch.mean(probs, 0, out=out[i, top:top + chunk])
    return out.masked_fill_(~_allowed(step, rows, cols), 0.0)


def candidate_mean(step: Step) -> Tensor:
    """Each candidate's mean attention over the (valid) candidates: [N, V]. A row's probabilities sum to 1, so this
    is 1 minus what it pays the other keys it may attend (CLS, context patches, the text before the image): only
    that narrow block is formed, not the [V, V] one."""
    s = step.q.shape[2]
    others, others_valid = pack(step.key_valid & ~unpack(step.cand, step.cand_valid, s))  # [N, O]
    paid = (attention_block(step, step.cand, others) * others_valid[:, None, :]).sum(-1)  # [N, V]
    return (1 - paid) / step.cand_valid.sum(1, keepdim=True).clamp(min=1) * step.cand_valid


def _allowed(step: Step, rows: Tensor, cols: Tensor) -> Tensor:
    """Which keys `cols` ([N, C] or [1, C]) each query row `rows` [N, R] may attend: [N, R, C] (real keys; causal in
    the LLM)."""
    cols = cols.expand(rows.shape[0], -1)
    allowed = step.key_valid.gather(1, cols)[:, None, :].expand(-1, rows.shape[1], -1)
    return allowed & (cols[:, None, :] <= rows[..., None]) if step.causal else allowed


def _rows_of(x: Tensor, index: Tensor) -> Tensor:
    """x [N, H, S, d] at per-row sequence positions index [N, R] -> [N, R, H, d] (contiguous)."""
    n, h, s, d = x.shape
    x = x.transpose(1, 2)  # [N, S, H, d]: the captured projections' own layout, where whole rows copy fast
    if not x.is_contiguous():  # rotated LLM q / k are [N, H, S, d] tensors of their own
        return x[torch.arange(n, device=index.device)[:, None], index]
    flat = index + s * torch.arange(n, device=index.device)[:, None]
    return x.reshape(n * s, h, d).index_select(0, flat.view(-1)).view(n, -1, h, d)


def query_attention(q: Tensor, k: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) over the allowed keys: q [N, H, R, d], k [N, Hkv, S, d],
    allowed [N, R, S] (None: every key) -> [N, R, S] fp32. Rows with no allowed key (padding) get zeros.

    A bf16 model's logits are bf16 products (fp32 accumulation, rounded once: about the rounding its q / k already
    carry), any other model's fp32; the softmax is fp32. Dense keys of the compute dtype (a KV cache) are read in
    place.
    """
    n, h, r, _ = q.shape
    s = k.shape[2]
    heads = torch.full((1, h), 1 / h, device=q.device)  # the head mean as one product
    total = torch.zeros(n, r, s, device=q.device)
    for nb, top, end, keys, logits in _logit_blocks(q, k, allowed):
        _head_mean(heads, torch.softmax(logits, -1, out=logits), total[nb, top:end, :keys])
    if allowed is not None:
        total.nan_to_num_(0.0)  # a row with every key blocked is all NaN
    return total


def query_logsumexp(q: Tensor, k: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Per head, the log of each query row's softmax normaliser over its allowed keys: q [N, H, R, d],
    k [N, Hkv, S, d] -> [N, H, R] fp32 (+inf for a row with no allowed key, so that its probabilities read 0)."""
    n, h, r, _ = q.shape
    out = torch.full((n, h, r), float("inf"), device=q.device)
    for nb, top, end, _, logits in _logit_blocks(q, k, allowed):
        peak = logits.amax(-1, keepdim=True)  # in place from here on: torch.logsumexp allocates three temporaries
        peak.masked_fill_(peak == float("-inf"), 0.0)  # a row with no allowed key: its sum is 0, its log -inf
        out[nb, :, top:end] = logits.sub_(peak).exp_().sum(-1).log_().add_(peak[..., 0])
    return out.masked_fill_(out == float("-inf"), float("inf"))


def _logit_blocks(q: Tensor, k: Tensor, allowed: Tensor | None):
    """Yield (batch slice, first row, end row, keys, fp32 logits [b, H, rows, keys] with blocked keys at -inf) for
    cache-sized blocks of query rows; each block's logits live in one reused buffer."""
    n, h, r, d = q.shape
    s = k.shape[2]
    if r * s == 0:
        return
    dtype = _logit_dtype(q)
    q = q.to(dtype)  # read in place: a product takes strided query rows at full speed (not strided keys)
    group = h // k.shape[1]  # grouped-query attention: `group` query heads share each key head
    k = k if k.dtype == dtype and k.is_contiguous() else _contiguous(k, dtype)  # [N, Hkv, S, d]
    blocked = None if allowed is None else ~allowed  # [N, R, S]
    rows = max(1, _CHUNK // (h * s))  # query rows per product
    blocks = _row_blocks(allowed, r, s, rows)
    batch = max(1, min(n, rows // r))  # batch rows per product: several only when each has few query rows (decoding)
    size = batch * h * max((end - top) * keys for top, end, keys in blocks)
    logits = torch.empty(size, dtype=dtype, device=q.device)
    as_fp32 = None if dtype == torch.float32 else torch.empty(size, device=q.device)  # bf16 logits, fp32 softmax
    # a key prefix is copied dense once per block: a batched product would copy a strided one itself, per head
    k_buffer = None if all(keys == s for _, _, keys in blocks) else torch.empty_like(k[:batch])
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
            if as_fp32 is not None:
                part = as_fp32[:part.numel()].view(shape).copy_(part)
            yield nb, top, end, keys, part


def _logit_dtype(q: Tensor) -> torch.dtype:
    """bf16 products for a bf16 model (fp32 accumulation, rounded once: about the rounding its q / k already carry),
    fp32 for any other."""
    return torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32


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


def masked_mean(x: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Mean of x over `dim`, counting only entries where `valid` (broadcastable to x)."""
    valid = valid.to(x.dtype).expand_as(x)
    return (x * valid).sum(dim) / valid.sum(dim).clamp(min=1)
