"""The planner: its sample, its metrics and intervals, its recommendation rule, and one whole plan of the bundled
model on held-out scenes through the real entry point (jobs/plan.py, a local Ray in this test's loopback
namespace), whose job.yaml is then run as a real job to check the plan's agreement against the job's own output."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from transformers import AutoConfig

from pipeline import agreement, sample
from pipeline.bundled import BUNDLED_MODEL_DIR
from pipeline.config import ConfigError, JobConfig
from pipeline.planner import PlanConfig, configurations, pareto_labels, parse_args, recommend
from pipeline.sources import list_shards
from reference import scenes
from tests.pipeline_data import good_images, write_tar_shard

ROOT = Path(__file__).resolve().parents[1]
FS = pafs.LocalFileSystem()


# --- metrics and intervals -----------------------------------------------------------------------------------------

def test_answers_match_after_normalising_case_punctuation_and_articles():
    assert agreement.exact_match("The Red circle.", "red circle") == 1.0
    assert agreement.exact_match("two", "three") == 0.0


def test_token_f1_is_the_harmonic_mean_of_word_precision_and_recall():
    # 2 of 3 output words are in the 4-word reference: precision 2/3, recall 2/4 -> F1 = 4/7.
    assert agreement.token_f1("green square blue", "a green square , red cross") == pytest.approx(4 / 7)
    assert agreement.token_f1("", "") == 1.0 and agreement.token_f1("green", "") == 0.0


def test_wilson_interval_at_its_closed_forms():
    low, high = agreement.wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(1.959964 ** 2 / (10 + 1.959964 ** 2))  # z^2 / (n + z^2) at p = 0
    low, high = agreement.wilson_interval(50, 100)
    assert (low + high) / 2 == pytest.approx(0.5) and 0.40 < low < 0.41  # symmetric at 1/2, about +-0.097
    mean, (low, high) = agreement.mean_with_interval([1.0] * 6)
    assert mean == 1.0 and high == 1.0 and low < 0.7  # six perfect rows are not certainty


# --- the sample ----------------------------------------------------------------------------------------------------

def _parquet_dataset(root: Path, shard_rows: list[int]) -> None:
    """Shards of `id, image, truth` rows with ids `s<shard>-<row>`, in row groups of 7 rows."""
    for s, n in enumerate(shard_rows):
        ids = [f"s{s}-{r}" for r in range(n)]
        table = pa.table({"id": ids, "image": [b"x"] * n, "truth": [f"truth of {i}" for i in ids]})
        pq.write_table(table, root / f"part-{s}.parquet", row_group_size=7)


def _draw(root: Path, n: int, seed: int, fmt: str = "auto", reference: str | None = None) -> pa.Table:
    config = JobConfig(input=str(root), format=fmt)
    shards = list_shards(FS, str(root), config)
    count = sample.count_rows(FS, shards, seed, retry_seconds=0)
    return sample.read_sample(FS, shards, sample.draw(count, n, seed), config, reference)


def test_the_sample_is_reproducible_from_its_seed_uniform_and_spread_over_shards(tmp_path):
    _parquet_dataset(tmp_path, [100, 40, 60, 200])
    first, again, other = (_draw(tmp_path, 120, seed).to_pylist() for seed in (3, 3, 4))
    ids = [r["source_id"] for r in first]
    assert ids == [r["source_id"] for r in again] and ids != [r["source_id"] for r in other]
    assert len(set(ids)) == 120 and [r["id"] for r in first] == [f"{i:06d}" for i in range(120)]
    # Uniform over rows: each shard's share of the sample is near its share of the 400 rows (120 x 100/400 = 30, ...).
    per_shard = Counter(r["source_shard"] for r in first)
    for shard, rows in zip([f"part-{s}.parquet" for s in range(4)], [100, 40, 60, 200]):
        assert abs(per_shard[shard] - 120 * rows / 400) < 4 * math.sqrt(120 * rows / 400), per_shard
    assert all(r["image"] == b"x" and r["reference"] is None for r in first)


def test_the_reference_column_comes_with_its_row_and_a_missing_one_is_refused(tmp_path):
    _parquet_dataset(tmp_path, [30, 30])
    rows = _draw(tmp_path, 10, 0, reference="truth").to_pylist()
    assert all(r["reference"] == f"truth of {r['source_id']}" for r in rows)
    with pytest.raises(ConfigError, match="no column 'label'"):
        _draw(tmp_path, 10, 0, reference="label")


def test_tar_rows_are_counted_from_headers_and_estimated_beyond_the_counted_tars(tmp_path, monkeypatch):
    sizes = [5, 8, 6, 7, 9, 4]
    for t, n in enumerate(sizes):
        images = dict(zip([f"t{t}-{i}.jpg" for i in range(n)], good_images(n, seed=t)))
        write_tar_shard(tmp_path / f"shard-{t}.tar", images, {name: f"q {name}" for name in images})
    config = JobConfig(input=str(tmp_path))
    shards = list_shards(FS, str(tmp_path), config)
    exact = sample.count_rows(FS, shards, seed=0, retry_seconds=0)
    assert exact.exact and exact.rows == sizes and exact.interval == (39.0, 39.0)
    monkeypatch.setattr(sample, "TARS_COUNTED", 3)
    estimate = sample.count_rows(FS, shards, seed=0, retry_seconds=0)
    counted = [n for n in estimate.rows if n is not None]
    assert not estimate.exact and len(counted) == 3
    assert estimate.total == pytest.approx(6 * sum(counted) / 3)
    assert estimate.interval[0] < estimate.total < estimate.interval[1]
    drawn = sample.read_sample(FS, shards, sample.draw(estimate, 10, 0), config, "question").to_pylist()
    counted_names = {s.name for s, n in zip(shards, estimate.rows) if n is not None}
    assert {r["source_shard"] for r in drawn} <= counted_names
    assert all(r["reference"] == f"q {r['source_id']}.jpg" and r["image"] for r in drawn)


# --- configurations and the recommendation -------------------------------------------------------------------------

def test_infeasible_budgets_are_skipped_with_the_methods_reason():
    model_config = AutoConfig.from_pretrained(BUNDLED_MODEL_DIR)
    chosen, skipped = configurations(model_config, PlanConfig(methods=("visionzip", "fastv"), ratios=(0.5, 0.01)))
    labels = [c.label for c in chosen]
    assert labels[0] == "none" and "visionzip@ratio=0.5" in labels and "fastv@ratio=0.5" in labels
    assert {(s["reducer"], s["ratio"]) for s in skipped} >= {("fastv", 0.01)}
    assert all(s["reason"] for s in skipped)


def _entry(label: str, cost: float, agree: float, low: float, hours: float = 1.0) -> dict:
    return {"label": label, "cost_per_1000_images_usd": cost, "projected_cost_usd": cost * 1000,
            "projected_hours": hours, "agreement": agree, "agreement_ci": [low, 1.0]}


def test_the_recommendation_is_the_cheapest_meeting_floor_budget_and_deadline():
    entries = [_entry("none", 3.0, 1.0, 1.0, hours=9), _entry("a@0.5", 2.0, 0.99, 0.98, hours=5),
               _entry("a@0.1", 1.0, 0.90, 0.85, hours=2), _entry("b@0.5", 2.5, 0.99, 0.975, hours=6)]
    chosen, _ = recommend(entries, PlanConfig(methods=(), ratios=(1.0,), quality_floor=0.97))
    assert chosen["label"] == "a@0.5"
    chosen, _ = recommend(entries, PlanConfig(methods=(), ratios=(1.0,), quality_floor=0.8, budget_usd=1500))
    assert chosen["label"] == "a@0.1"
    chosen, nearest = recommend(entries, PlanConfig(methods=(), ratios=(1.0,), quality_floor=0.97, deadline=3))
    assert chosen is None
    assert nearest == {"cheapest_meeting_floor": "a@0.5", "most_agreeing_within_budget_and_deadline": "a@0.1"}
    assert pareto_labels(entries) == {"none", "a@0.5", "a@0.1"}  # b@0.5 costs more than a@0.5 for no more agreement


def test_plan_help_has_the_planner_section_and_no_flag_for_what_it_chooses():
    from pipeline.planner import SWEPT, build_plan_parser

    text = build_plan_parser().format_help()
    assert "\nplanner:\n" in text and "--quality-floor" in text and "--input" in text
    assert not any(f"--{name.replace('_', '-')} " in text for name in SWEPT)


def test_bad_planner_settings_are_refused_naming_the_flag():
    with pytest.raises(ConfigError, match="--methods: unknown nosuch"):
        parse_args(["--methods", "visionzip,nosuch"])
    with pytest.raises(ConfigError, match="--ratios"):
        parse_args(["--ratios", "0.5,1.5"])
    with pytest.raises(ConfigError, match="--quality-floor"):
        parse_args(["--quality-floor", "97"])


# --- a whole plan, then its job ------------------------------------------------------------------------------------

def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_a_plan_on_held_out_scenes_and_its_job_yaml_run_as_a_job_agree(tmp_path):
    data, plan_dir = tmp_path / "data", tmp_path / "plan"
    data.mkdir()
    scenes.write_parquet(data / "a.parquet", range(60_000_000, 60_000_010))  # held out: far from training seeds
    scenes.write_parquet(data / "b.parquet", range(60_000_100, 60_000_110))
    done = _run("plan.py", "--input", str(data), "--output", str(plan_dir), "--methods", "visionzip,fastv",
                "--ratios", "0.33,0.11", "--sample", "12", "--quality-floor", "0.6", "--reference-column", "caption",
                "--dtype", "fp32")
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((plan_dir / "plan.json").read_text())
    assert plan["dataset_rows"] == 20 and plan["dataset_rows_exact"] and plan["sample_rows"] == 12
    assert {e["label"] for e in plan["configurations"]} == {
        "none", "visionzip@ratio=0.33", "visionzip@ratio=0.11", "fastv@ratio=0.33", "fastv@ratio=0.11"}
    for e in plan["configurations"]:
        assert e["rows"] == 12 and e["errors"] == 0
        assert e["agreement_ci"][0] <= e["agreement"] <= e["agreement_ci"][1]
        assert e["accuracy"] is not None and e["device_seconds_per_image"] > 0
        assert e["projected_cost_usd"] == pytest.approx(e["cost_per_1000_images_usd"] * 20 / 1000)
    none = next(e for e in plan["configurations"] if e["reducer"] == "none")
    assert none["accuracy"] > 0.9  # the reference model captions held-out scenes (98 % on its benchmark)
    # The recommendation follows the rule on the plan's own figures.
    eligible = [e for e in plan["configurations"] if e["agreement_ci"][0] >= 0.6]
    cheapest = min(eligible, key=lambda e: e["cost_per_1000_images_usd"])
    assert plan["recommendation"]["label"] == cheapest["label"]
    for name in ("plan.md", "pareto.png", "job.yaml"):
        assert (plan_dir / name).stat().st_size > 0
    assert (plan_dir / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recommended:" in done.stdout and "job.yaml" in done.stdout

    # job.yaml runs; the plan's agreement for that configuration is what the real job writes, row for row.
    sample_rows = pq.read_table(plan_dir / "sample" / "sample.parquet").to_pylist()
    chosen_job, unreduced_job = tmp_path / "chosen", tmp_path / "unreduced"
    done = _run("caption.py", "--config", str(plan_dir / "job.yaml"), "--input", str(plan_dir / "sample"),
                "--output", str(chosen_job))
    assert done.returncode == 0, done.stderr[-3000:]
    done = _run("caption.py", "--input", str(plan_dir / "sample"), "--output", str(unreduced_job), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = {r["id"]: r for r in pq.read_table(chosen_job / "results").to_pylist()}
    unreduced = {r["id"]: r["text"] for r in pq.read_table(unreduced_job / "results").to_pylist()}
    assert set(chosen) == {r["id"] for r in sample_rows}
    assert {r["reducer"] for r in chosen.values()} == {plan["recommendation"]["reducer"]}
    recomputed = sum(agreement.token_f1(chosen[i]["text"], unreduced[i]) for i in chosen) / len(chosen)
    assert recomputed == pytest.approx(plan["recommendation"]["agreement"])


def test_a_sweep_runs_each_configuration_in_batches_of_its_own_size(tmp_path):
    """What --batch-size auto gives the sweep: each configuration its own batch, within blocks of the largest."""
    from pipeline.config import Configuration
    from pipeline.config import parse_args as job_args
    from pipeline.planner import sweep

    scenes.write_parquet(tmp_path / "sample.parquet", range(60_000_200, 60_000_207))  # 7 rows, one shard
    job = job_args("caption", ["--batch-size", "5", "--dtype", "fp32"])
    chosen = [Configuration("none", batch_size=2), Configuration("visionzip", ratio=0.11, batch_size=5)]
    import ray

    try:
        rows, _, _ = sweep(job, str(tmp_path / "sample.parquet"), chosen)
    finally:
        ray.shutdown()  # the sweep starts a local Ray; later modules start their own
    for configuration, largest in ((chosen[0], 2), (chosen[1], 5)):
        batches = [r["cost"]["n_rows"] for r in rows if r["configuration"] == configuration.label and r["cost"]]
        assert sum(batches) == 7 and max(batches) == largest, (configuration.label, batches)
