"""The quality audit inside a job (--audit-share): a seeded share of the rows also runs through the unreduced
model on the same actors, and each audited row's output is scored against the unreduced one with the planner's
metric (pipeline/agreement.py). The pick is a hash of (seed, shard, id), so a resumed or repeated job audits the
same rows, and any tool can recompute it.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import pyarrow as pa

from pipeline import agreement
from pipeline.config import Configuration
from pipeline.schema import AUDIT_SCHEMA

UNREDUCED = Configuration("none")


def picked(seed: int, shard: str, row_id: str, share: float) -> bool:
    """Whether the row is audited: its hash, read as a fraction of 2^64, falls below `share`."""
    digest = hashlib.blake2b(f"{seed}\x00{shard}\x00{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2 ** 64


def scored(results: list[dict[str, Any]], unreduced: list[dict[str, Any]],
           metric: Callable[[str | None, str | None], float]) -> pa.Table:
    """AUDIT_SCHEMA rows: each audited row's output, the unreduced output and their agreement (null if either
    failed)."""
    text = {r["id"]: r for r in results}
    rows = []
    for u in unreduced:
        mine = text[u["id"]]
        ok = mine["error"] is None and u["error"] is None
        rows.append({"id": u["id"], "shard": u["shard"], "text": mine["text"], "unreduced_text": u["text"],
                     "agreement": metric(mine["text"], u["text"]) if ok else None})
    return pa.Table.from_pylist(rows, schema=AUDIT_SCHEMA)


def summarize(audited: int, agreement_sum: float, cost_usd: float, share: float, task: str) -> dict[str, Any]:
    """summary.json's `audit`: rows audited, their mean agreement with its 95 % interval, what the audit cost."""
    mean = agreement_sum / audited if audited else None
    low, high = agreement.wilson_interval(agreement_sum, audited)
    return {"share": share, "rows": audited, "metric": agreement.METRICS[task].__name__, "agreement": mean,
            "agreement_ci": [low, high], "cost_usd": cost_usd}
