"""Surgery on transformers' KV cache: per-row selections of one layer's entries, in place."""
from __future__ import annotations

import torch
from torch import Tensor

from ..rows import pack


def gather_cache(cache, layer: int, index: Tensor) -> None:
    """Keep only the entries `index` [B, W] (per row) of one layer's K/V cache."""
    entries = cache.layers[layer]
    heads, dim = entries.keys.shape[1], entries.keys.shape[3]
    at = index[:, None, :, None].expand(-1, heads, -1, dim)
    entries.keys, entries.values = entries.keys.gather(2, at), entries.values.gather(2, at)


def compact_cache(cache, layer: int, keep: Tensor) -> Tensor:
    """Drop the entries not in `keep` [B, S] from one layer's K/V cache in place, moving few entries: the cache loses
    its first `cut` columns (width: the fullest row's count) as a view, and the kept entries among them move into
    dropped slots further right. Attention does not depend on the entries' order (keys carry their RoPE, the mask
    follows the layout), so everything else stays where it is; with cut = 0 nothing moves and the dropped entries
    are padding until a later eviction narrows the cache. Returns [B, W]: the old column each new column holds."""
    rows, width = keep.shape
    cut = width - int(keep.sum(1).max())
    movers, movers_valid = pack(keep[:, :cut])  # [B, M] kept entries in the columns that go
    # every row has at least as many free slots as movers; `pack` pads both with distinct other columns, so the
    # padded pairs copy a column onto itself and no slot is written twice
    slots = pack(~keep[:, cut:])[0][:, :movers.shape[1]]  # [B, M] new columns
    sources = torch.where(movers_valid, movers, slots + cut)
    entries, row = cache.layers[layer], torch.arange(rows, device=keep.device)[:, None]
    for name in ("keys", "values"):
        full = getattr(entries, name)  # [B, Hkv, S, d]
        kept = full[:, :, cut:]
        # indexing in place: `scatter_` would copy the strided view whole; the read copies before the write
        kept.transpose(1, 2)[row, slots] = full.transpose(1, 2)[row, sources]  # [B, M, Hkv, d]
        setattr(entries, name, kept)
    index = torch.arange(cut, width, device=keep.device).expand(rows, -1)  # [B, W]
    return index.scatter(1, slots, sources)
