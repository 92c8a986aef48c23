"""The model actor: loads the model once, attaches the job's reducer, and turns prepared rows into result rows
plus one ledger (cost) row per model batch. The planner gives it several configurations: each batch then runs
through every one of them in turn (one model load for the whole sweep), each output row tagged with its own.
With --audit-share, the audited rows of each batch also run unreduced (pipeline/audit.py).

A model batch never mixes input shards, so every ledger row belongs to exactly one shard. Rows that failed
upstream are passed through as error rows and counted in the ledger row of the batch they arrived in.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict
from itertools import groupby
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch
from transformers import AutoModelForImageTextToText

import reducers
import reducers.accounting
from pipeline import audit
from pipeline.bundled import resolve_model
from pipeline.config import Configuration, JobConfig
from pipeline.decode import load_processor, unpack
from pipeline.schema import OUTPUT_SCHEMA, SHARD_NOT_STARTED

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

ZERO_COST = reducers.accounting.Cost(flops_vision=0, flops_projector=0, flops_prefill=0, flops_decode=0,
                                     flops_total=0, kv_bytes_peak=0)


def load_model(path: str, dtype: torch.dtype, on_gpu: bool):
    """A LLaVA checkpoint (local path or hub id), loaded the same way by the actor and the benchmark."""
    placement = {"device_map": "auto"} if on_gpu else {}  # accelerate spreads the weights over the actor's GPUs
    # use_kernels=False: Hub kernels are code downloaded at load time (on by default from transformers 5.25); trimlens
    # runs only the model's own code, as with trust_remote_code.
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, use_kernels=False, **placement).eval()


def collate(rows: list[dict[str, np.ndarray]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Per-row processor arrays -> one batch. Token rows are left-padded (generation continues on the right);
    other arrays are zero-padded along their first axis (AnyRes models give images different crop counts)."""
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)          # [B, S]
    mask = torch.zeros((len(rows), longest), dtype=torch.long)                      # [B, S]
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, longest - n:] = torch.from_numpy(r["input_ids"].astype(np.int64))
        mask[i, longest - n:] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    for name in rows[0]:
        if name in batch:
            continue
        arrays = [r[name] for r in rows]
        if arrays[0].ndim and len({a.shape[0] for a in arrays}) > 1:
            size = max(a.shape[0] for a in arrays)
            arrays = [np.concatenate([a, np.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)]) for a in arrays]
        batch[name] = torch.from_numpy(np.stack(arrays))                            # [B, ...]
    return batch


class ModelActor:
    """One model copy. Ray calls it with PREPARED_SCHEMA tables and gets OUTPUT_SCHEMA tables back."""

    def __init__(self, config: JobConfig, gpus: float, cpus: float, configurations: list[Configuration] | None = None,
                 cost_gate: Any = None):
        self.config = config
        self.cost_gate = cost_gate  # --max-cost-usd: a costcap.CostGate handle
        self.configurations = configurations or [config.configuration()]
        self.gpus = gpus
        on_gpu = gpus > 0 and torch.cuda.is_available()
        if not on_gpu:
            torch.set_num_threads(max(1, int(cpus)))  # a fractional CPU share still runs one thread
        self.model = load_model(resolve_model(config.model), TORCH_DTYPES[config.dtype], on_gpu)
        self.processor = load_processor(config.model)
        self.configuration = self.configurations[0]
        self.attachment = reducers.attach(self.model, self.configuration.reducer, **self.configuration.budget())
        self.device = torch.cuda.get_device_name() if on_gpu else "cpu"
        self.name = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.batches = 0
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows, refused = self._admitted(batch.to_pylist())
        share, seed = self.config.audit_share, self.config.audit_seed
        # Audited rows first: the driver then holds them when the last result row completes their shard.
        audited = [r for r in rows if share and r["error"] is None and audit.picked(seed, r["shard"], r["id"], share)]
        out = self._run_through(audit.UNREDUCED, audited) if audited else []
        for configuration in self.configurations:
            out.extend(self._run_through(configuration, rows))
        out.extend({"id": r["id"], "shard": r["shard"], "shard_rows": SHARD_NOT_STARTED, "question": r["question"],
                    "error": "not started: --max-cost-usd reached", "configuration": self.configuration.label}
                   for r in refused)
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def _admitted(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(rows to run, rows of shards the cost gate does not let start)."""
        if self.cost_gate is None:
            return rows, []
        admitted = set(ray.get(self.cost_gate.admit.remote(sorted({r["shard"] for r in rows}))))
        return [r for r in rows if r["shard"] in admitted], [r for r in rows if r["shard"] not in admitted]

    def _run_through(self, configuration: Configuration, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`rows` through one configuration, in model batches that never mix shards."""
        self._switch_to(configuration)
        out: list[dict[str, Any]] = []
        size = configuration.batch_size or self.config.batch_size
        for _, same_shard in groupby(rows, key=lambda r: r["shard"]):
            shard_rows = list(same_shard)
            for start in range(0, len(shard_rows), size):
                out.extend(self._run(shard_rows[start:start + size]))
        return out

    def _switch_to(self, configuration: Configuration) -> None:
        """Attach `configuration`'s reducer unless it is the one attached (a job without an audit keeps its one)."""
        if configuration != self.configuration:
            self.attachment.detach()
            self.attachment = reducers.attach(self.model, configuration.reducer, **configuration.budget())
            self.configuration = configuration

    def _run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One model batch; if generate fails, each row is retried alone so one bad row fails only itself."""
        try:
            return self._generate(rows)
        except Exception as e:  # noqa: BLE001 -- a failing batch must not fail the job
            if sum(r["error"] is None for r in rows) <= 1:
                reason = f"generation failed: {type(e).__name__}: {e}"
                return self._generate([{**r, "error": r["error"] or reason} for r in rows])
            return [out for r in rows for out in self._run([r])]

    def _generate(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        live = [i for i, r in enumerate(rows) if r["error"] is None]
        per_row: dict[int, dict[str, Any]] = {}
        cost = unreduced = ZERO_COST
        if live:
            inputs = collate([unpack(rows[i]["inputs"]) for i in live], self.processor.tokenizer.pad_token_id)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.config.max_new_tokens, do_sample=False)
            new = ids[:, inputs["input_ids"].shape[1]:].cpu()                        # [B, T]
            stats = self.attachment.last
            cost = reducers.accounting.batch_cost(self.model.config, stats)
            unreduced = reducers.accounting.unreduced_cost(self.model.config, stats)
            texts = self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
            for b, i in enumerate(live):
                per_row[i] = {"text": texts[b].strip(), "visual_tokens_in": stats.visual_tokens_in[b],
                              "visual_tokens_budget": stats.visual_tokens_budget[b],
                              "visual_tokens_kept": float(stats.visual_tokens_avg[b]),
                              "prompt_tokens": stats.prompt_tokens[b],
                              "generated_tokens": self._generated_tokens(new[b].tolist())}
        wall = time.perf_counter() - start
        self.batches += 1
        batch_id = f"{self.name}-{self.batches:06d}"
        results = [{"id": r["id"], "shard": r["shard"], "shard_rows": r["shard_rows"], "question": r["question"],
                    "error": r["error"], "model": self.config.model,
                    "reducer": self.configuration.reducer, "configuration": self.configuration.label,
                    "batch_id": batch_id, **per_row.get(i, {})} for i, r in enumerate(rows)]
        ledger_row = self._ledger_row(batch_id, results, cost, unreduced, wall)
        if self.cost_gate is not None:
            self.cost_gate.spend.remote(ledger_row["cost_usd"])  # calls from one actor arrive in order
        results[0]["cost"] = json.dumps(ledger_row)
        return results

    def _generated_tokens(self, new_ids: list[int]) -> int:
        """New tokens up to and including the first end-of-sequence (the padding after it is not generated)."""
        for n, token in enumerate(new_ids, 1):
            if token in self.eos_ids:
                return n
        return len(new_ids)

    def _ledger_row(self, batch_id: str, results: list[dict[str, Any]], cost: reducers.accounting.Cost,
                    unreduced: reducers.accounting.Cost, wall: float) -> dict[str, Any]:
        def total(name: str) -> float:
            return sum(r.get(name) or 0 for r in results)

        # A CPU actor occupies one device slot; a GPU actor the GPU share it asked Ray for.
        device_seconds = wall * (self.gpus if self.gpus > 0 else 1.0)
        spent = asdict(cost)
        return {"batch_id": batch_id, "shard": results[0]["shard"], "actor": self.name, "n_rows": len(results),
                "n_errors": sum(r["error"] is not None for r in results),
                "visual_tokens_in": int(total("visual_tokens_in")),
                "visual_tokens_kept": float(total("visual_tokens_kept")),
                "prompt_tokens": int(total("prompt_tokens")), "generated_tokens": int(total("generated_tokens")),
                **{k: spent[k] for k in ("flops_vision", "flops_projector", "flops_prefill", "flops_decode",
                                         "flops_total", "kv_bytes_peak")},
                "flops_total_unreduced": unreduced.flops_total,
                "wall_s": wall, "device": self.device, "device_seconds": device_seconds,
                "cost_usd": device_seconds / 3600 * self.config.price_per_gpu_hour,
                "configuration": self.configuration.label}
