"""What one generate did (`Attachment.last`): token counts per row and layer, cache sizes, timings.

Written by the runtime, read by the accounting (`accounting.batch_cost`), the job's actor and the benchmarks.
`as_dict()` is the plain view `Attachment.stats` offers (docs/reducers.md lists its keys).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    """Counts are of each row's real (non-pad) tokens; L: LLM layers, Lv: tower layers, B: prompt rows."""
    dtype_bytes: int                         # bytes of one cached K or V element
    method: str = ""
    rows: int = 0                            # B
    prompt_tokens: list[int] = field(default_factory=list)         # [B] real prompt tokens, <image> placeholders too
    visual_tokens_in: list[int] = field(default_factory=list)      # [B] full visual count (the placeholders)
    visual_tokens_budget: list[int] = field(default_factory=list)  # [B] layer-averaged budget N
    visual_tokens_per_layer: list[list[int]] = field(default_factory=list)  # [L][B] in prefill
    tokens_per_layer: list[list[int]] = field(default_factory=list)         # [L][B] text + visual, in prefill
    visual_tokens_avg: list[float] = field(default_factory=list)            # [B] layer average: the budget's meaning
    vision_tokens_per_layer: list[int] = field(default_factory=list)        # [Lv] entering each tower layer, all crops
    num_crops: int = 0
    kv_entries_prefill: list[list[int]] = field(default_factory=list)       # [L][B] valid cache entries after prefill
    kv_entries_end: list[list[int]] = field(default_factory=list)           # [L][B] after the last forward
    kv_entries_per_step: list[list[list[int]]] = field(default_factory=list)      # [step][L][B], prefill is step 0
    visual_entries_per_step: list[list[list[int]]] = field(default_factory=list)  # [step][L][B] visual ones
    kv_bytes_peak: int = 0                   # allocated K + V bytes at their largest, padding included
    decode_steps: int = 0
    prefill_seconds: float = 0.0             # the vision tower included
    decode_seconds: float = 0.0
    scoring_seconds: float = 0.0             # inside the method's own filter / correlate / compress

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, stats: "Stats | Mapping[str, Any]") -> "Stats":
        """Stats from itself or from its dict view (as `Attachment.stats` or a saved record holds it; a dict may
        leave out what its reader does not use, except dtype_bytes)."""
        return stats if isinstance(stats, Stats) else cls(**stats)
