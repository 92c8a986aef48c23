"""The model actor without Ray: result rows, one ledger row per model batch, shards never mixed, failures per row."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.actor import ModelActor, collate, load_model
from pipeline.config import JobConfig
from pipeline.decode import pack, prepare, unpack
from pipeline.schema import COST_SCHEMA, OUTPUT_SCHEMA, RESULT_SCHEMA, SOURCE_SCHEMA
from pipeline_data import bad_images, good_images, odd_images, save_test_model
from reference.test_models import LlavaSpec, save_tiny


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return str(save_test_model(tmp_path_factory.mktemp("model") / "tiny"))


def _prepared(config: JobConfig, shards: dict[str, dict[str, bytes]]) -> pa.Table:
    rows = [{"id": i, "shard": s, "shard_rows": len(samples), "image": data, "question": None, "error": None}
            for s, samples in shards.items() for i, data in samples.items()]
    return prepare(pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA), config)


def _ledger(out: pa.Table) -> list[dict]:
    return [json.loads(c) for c in out.column("cost").to_pylist() if c is not None]


def test_models_load_without_hub_kernels(model_path):
    """transformers 5.25 turns Hub kernels (code fetched at load time) on by default; trimlens keeps them off."""
    import torch

    assert load_model(model_path, torch.float32, on_gpu=False).use_kernels is False


def test_output_tables_have_the_promised_columns():
    assert {"id", "shard", "text", "question", "error", "model", "reducer", "visual_tokens_budget", "visual_tokens_in",
            "prompt_tokens", "generated_tokens"} <= set(RESULT_SCHEMA.names)
    assert {"batch_id", "shard", "actor", "n_rows", "n_errors", "visual_tokens_in", "visual_tokens_kept",
            "prompt_tokens", "generated_tokens", "flops_prefill", "flops_decode", "kv_bytes_peak", "wall_s", "device",
            "device_seconds", "cost_usd"} <= set(COST_SCHEMA.names)
    assert OUTPUT_SCHEMA.names[:len(RESULT_SCHEMA)] == RESULT_SCHEMA.names


def test_collate_left_pads_tokens_and_zero_pads_crops():
    rows = [{"input_ids": np.array([5, 6, 7]), "pixel_values": np.ones((2, 3, 4, 4), np.float32)},
            {"input_ids": np.array([8]), "pixel_values": np.ones((1, 3, 4, 4), np.float32)}]
    batch = collate(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["pixel_values"].shape == (2, 2, 3, 4, 4) and batch["pixel_values"][1, 1].abs().sum() == 0


@pytest.mark.parametrize("reducer, budget", [("none", {}), ("fastv", {"visual_tokens": 32})])
def test_rows_and_ledger_add_up_and_batches_stay_in_their_shard(model_path, reducer, budget):
    config = JobConfig(model=model_path, reducer=reducer, batch_size=3, max_new_tokens=3, dtype="fp32", **budget)
    shards = {"a": dict(zip("abcd", good_images(4))), "b": {"e": good_images(1, seed=9)[0], **bad_images()}}
    out = ModelActor(config, gpus=0, cpus=1)(_prepared(config, shards))
    assert out.schema == OUTPUT_SCHEMA and out.num_rows == 8
    rows = out.to_pylist()
    ledger = _ledger(out)
    assert [c["shard"] for c in ledger] == ["a", "a", "b", "b"]  # 4 rows of a, 4 of b, batches of 3
    assert pa.Table.from_pylist(ledger, schema=COST_SCHEMA).num_rows == len(ledger)
    for shard in "ab":
        mine = [c for c in ledger if c["shard"] == shard]
        assert sum(c["n_rows"] for c in mine) == sum(r["shard"] == shard for r in rows)
        assert sum(c["n_errors"] for c in mine) == sum(r["shard"] == shard and r["error"] is not None for r in rows)
    by_batch = {c["batch_id"]: c for c in ledger}
    assert {r["batch_id"] for r in rows} == set(by_batch)
    for r in rows:
        if r["error"] is None:
            assert r["visual_tokens_in"] == 64 and 1 <= r["generated_tokens"] <= 3 and r["prompt_tokens"] > 64
            assert r["visual_tokens_budget"] == (32 if reducer == "fastv" else 64)
            assert r["visual_tokens_kept"] == pytest.approx(32 if reducer == "fastv" else 64, abs=1)
        else:
            assert r["text"] is None and r["visual_tokens_in"] is None
    for c in ledger:
        live = [r for r in rows if r["batch_id"] == c["batch_id"] and r["error"] is None]
        assert c["visual_tokens_in"] == sum(r["visual_tokens_in"] for r in live)
        assert c["generated_tokens"] == sum(r["generated_tokens"] for r in live)
        assert (c["flops_prefill"] > 0) == bool(live) and c["device"] == "cpu"
        assert c["cost_usd"] == pytest.approx(c["device_seconds"] / 3600 * config.price_per_gpu_hour)
    assert {r["id"] for r in rows if r["error"]} == set(bad_images())


def test_fastv_prefill_is_cheaper_than_none(model_path):
    costs = {}
    for reducer, budget in (("none", {}), ("fastv", {"visual_tokens": 16})):
        config = JobConfig(model=model_path, reducer=reducer, batch_size=4, max_new_tokens=2, dtype="fp32", **budget)
        table = _prepared(config, {"s": dict(zip("wxyz", good_images(4)))})
        costs[reducer] = _ledger(ModelActor(config, gpus=0, cpus=1)(table))[0]
    assert costs["fastv"]["flops_prefill"] < 0.6 * costs["none"]["flops_prefill"]
    assert costs["fastv"]["visual_tokens_kept"] == pytest.approx(4 * 16, abs=4)


def test_a_row_that_breaks_generate_fails_alone(model_path):
    config = JobConfig(model=model_path, batch_size=4, max_new_tokens=2, dtype="fp32")
    table = _prepared(config, {"s": dict(zip("abc", good_images(3)))})
    broken = unpack(table.column("inputs")[1].as_py())
    broken["input_ids"] = broken["input_ids"][-5:]  # no <image> tokens left for the image features
    inputs = table.column("inputs").to_pylist()
    inputs[1] = pack(broken)
    table = table.set_column(table.schema.get_field_index("inputs"), "inputs", pa.array(inputs, pa.binary()))
    out = ModelActor(config, gpus=0, cpus=1)(table).to_pylist()
    assert [r["error"] is None for r in out] == [True, False, True]
    assert out[1]["error"].startswith("generation failed") and out[0]["text"] is not None
    ledger = [json.loads(r["cost"]) for r in out if r["cost"]]
    assert sum(c["n_rows"] for c in ledger) == 3 and sum(c["n_errors"] for c in ledger) == 1


def test_llava_next_images_with_different_crop_counts_share_a_batch(tmp_path):
    path = str(tmp_path / "next")
    save_tiny(path, LlavaSpec(family="next", image_size=56, llm_layers=4))
    config = JobConfig(model=path, reducer="ficoco-v", ratio=0.5, batch_size=4, max_new_tokens=2, dtype="fp32")
    # a 1x1 image gets fewer AnyRes crops than the others: its crops are zero-padded in the batch
    images = {"a": good_images(1)[0], "b": good_images(1, seed=5)[0], "pixel": odd_images()["one-pixel.png"]}
    table = ModelActor(config, gpus=0, cpus=1)(_prepared(config, {"s": images}))
    out = table.to_pylist()
    assert [r["error"] for r in out] == [None] * 3 and len(_ledger(table)) == 1
    tokens_in = {r["id"]: r["visual_tokens_in"] for r in out}
    assert tokens_in["pixel"] < tokens_in["a"]
    assert all(r["visual_tokens_budget"] == round(r["visual_tokens_in"] * 0.5) for r in out)
