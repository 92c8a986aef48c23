"""The tables that flow between the stages, in the order they appear. Every stage states its output schema so a
column cannot silently change type between batches (a null in an all-null batch included)."""
from __future__ import annotations

import pyarrow as pa

# shard_rows values that are not counts: the shard could not be read (one row, `error` says why), or the model actor
# did not start the shard because --max-cost-usd was reached (its rows come back without results).
SHARD_FAILED = -1
SHARD_NOT_STARTED = -2

# sources.read_shard: one row per input sample; `error` is set when the sample cannot even be read (no image in it).
SOURCE_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()),
    ("shard_rows", pa.int64()),  # rows in the whole shard: tells the driver when a shard is complete
    ("image", pa.binary()), ("question", pa.string()), ("error", pa.string()),
])

# decode.prepare: the processor's arrays per row, np.savez-packed (null on error rows).
PREPARED_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()), ("shard_rows", pa.int64()),
    ("question", pa.string()), ("error", pa.string()), ("inputs", pa.binary()),
])

# OUTPUT/results: one row per input row.
RESULT_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()), ("text", pa.string()), ("question", pa.string()),
    ("error", pa.string()), ("model", pa.string()), ("reducer", pa.string()),
    ("visual_tokens_budget", pa.int64()), ("visual_tokens_in", pa.int64()),
    ("visual_tokens_kept", pa.float64()),  # layer-averaged visual tokens the LLM processed in prefill
    ("prompt_tokens", pa.int64()), ("generated_tokens", pa.int64()), ("batch_id", pa.string()),
])

# OUTPUT/costs: one row per model batch (the ledger).
COST_SCHEMA = pa.schema([
    ("batch_id", pa.string()), ("shard", pa.string()), ("actor", pa.string()),
    ("n_rows", pa.int64()), ("n_errors", pa.int64()),
    ("visual_tokens_in", pa.int64()), ("visual_tokens_kept", pa.float64()), ("prompt_tokens", pa.int64()),
    ("generated_tokens", pa.int64()), ("flops_vision", pa.int64()), ("flops_projector", pa.int64()),
    ("flops_prefill", pa.int64()), ("flops_decode", pa.int64()), ("flops_total", pa.int64()),
    ("flops_total_unreduced", pa.int64()),  # what the batch would have cost with `none` (accounting.unreduced_cost)
    ("kv_bytes_peak", pa.int64()), ("wall_s", pa.float64()), ("device", pa.string()),
    ("device_seconds", pa.float64()), ("cost_usd", pa.float64()),
    ("configuration", pa.string()),  # the job's reducer and budget, or `none` for a batch of --audit-share rows
])

# OUTPUT/audit: one row per audited row (--audit-share): the job's output next to the unreduced model's.
AUDIT_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.string()), ("text", pa.string()), ("unreduced_text", pa.string()),
    ("agreement", pa.float64()),  # agreement.METRICS[task](text, unreduced_text); null when either row failed
])

# actor.ModelActor -> driver: result rows with their shard's row count and their configuration's label (the planner
# runs several per row); the first row of each model batch also carries that batch's ledger row as JSON (one table
# type through Ray Data instead of two outputs).
OUTPUT_SCHEMA = (RESULT_SCHEMA.append(pa.field("shard_rows", pa.int64())).append(pa.field("configuration", pa.string()))
                 .append(pa.field("cost", pa.string())))
