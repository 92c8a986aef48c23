"""The vision tower's SDPA that keeps each query row's log-sum-exp at the layers a method scores."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

SDPA_WITH_LSE = "trimlens_sdpa"  # the vision tower's attention implementation while vision sites are attached
_lse_sinks: dict[nn.Module, Callable[[Tensor], None]] = {}  # site attention module -> who takes its log-sum-exp


def _sdpa_keeping_lse(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """The tower's SDPA. At a vision site on CPU it calls the kernel SDPA dispatches to there (same output, bit for
    bit), which also returns each query row's log-sum-exp: FiCoCo's scores need those softmax normalisers, and
    recomputing them would cost a second q k^T over every row. Elsewhere it is transformers' SDPA as it is."""
    sink = _lse_sinks.get(module)
    if sink is None or query.device.type != "cpu" or dropout or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None and attention_mask.dtype == torch.bool:  # as SDPA turns a boolean mask additive
        attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attention_mask, float("-inf"))
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, False, attn_mask=attention_mask, scale=scaling)  # [B, H, S, d], [B, H, S] fp32
    sink(lse)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA_WITH_LSE, _sdpa_keeping_lse)


class TowerKeepsLse:
    """While attached: the tower's attention is `_sdpa_keeping_lse` and its site layers hand over their
    log-sum-exp; `remove()` puts plain SDPA back (a handle like a hook's)."""

    def __init__(self, config, sinks: dict[nn.Module, Callable[[Tensor], None]]):
        self.config, self.sinks = config, sinks
        _lse_sinks.update(sinks)
        config._attn_implementation = SDPA_WITH_LSE

    def remove(self) -> None:
        for module in self.sinks:
            _lse_sinks.pop(module, None)
        self.config._attn_implementation = "sdpa"
