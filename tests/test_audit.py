"""--audit-share: the audited rows are exactly the seeded share, re-run unreduced on the same actors, and the
summary's agreement is what the Parquet files give when recomputed with pyarrow alone. A local Ray in this test's
loopback namespace, the bundled model on its sample scenes."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import ray

from pipeline import agreement
from pipeline.audit import picked
from pipeline.config import ConfigError, SAMPLES, parse_args
from pipeline.job import main, run


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_the_pick_is_a_seeded_share_of_the_rows():
    ids = [f"row-{i}" for i in range(4000)]
    share = [sum(picked(seed, "shard-0", i, 0.25) for i in ids) / len(ids) for seed in (0, 1)]
    assert all(abs(s - 0.25) < 0.03 for s in share)
    assert [picked(0, "shard-0", i, 0.25) for i in ids] != [picked(1, "shard-0", i, 0.25) for i in ids]
    assert not any(picked(0, "shard-0", i, 0.0) for i in ids) and all(picked(0, "shard-0", i, 1.0) for i in ids)


def test_an_audit_of_none_or_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match="runs none already"):
        parse_args("caption", ["--audit-share", "0.1"])
    with pytest.raises(ConfigError, match=r"--audit-share must be in \[0, 1\]"):
        parse_args("caption", ["--reducer", "visionzip", "--ratio", "0.33", "--audit-share", "1.5"])


def test_the_audit_reruns_the_picked_rows_unreduced_and_reports_their_agreement(local_ray, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--output", str(out), "--reducer", "visionzip", "--ratio", "0.11", "--audit-share", "0.5",
            "--audit-seed", "3", "--batch-size", "4", "--dtype", "fp32"]
    assert main("caption", args) == 0
    assert "rows also run unreduced" in capsys.readouterr().out
    results = pq.read_table(out / "results").to_pylist()
    audited = pq.read_table(out / "audit").to_pylist()
    costs = pq.read_table(out / "costs").to_pylist()
    expected = {r["id"] for r in results if picked(3, r["shard"], r["id"], 0.5)}
    assert 0 < len(expected) < len(results) and {a["id"] for a in audited} == expected
    text = {r["id"]: r["text"] for r in results}
    assert all(a["text"] == text[a["id"]] for a in audited)
    assert {r["reducer"] for r in results} == {"visionzip"} and len(results) == len(list(SAMPLES.glob("*.png")))
    # The unreduced outputs are the unreduced model's: a job with none captions those rows the same way.
    none_out = tmp_path / "none"
    run(parse_args("caption", ["--output", str(none_out), "--batch-size", "4", "--dtype", "fp32"]))
    unreduced = {r["id"]: r["text"] for r in pq.read_table(none_out / "results").to_pylist()}
    assert all(a["unreduced_text"] == unreduced[a["id"]] for a in audited)
    summary = json.loads((out / "summary.json").read_text())["audit"]
    scores = [agreement.token_f1(a["text"], a["unreduced_text"]) for a in audited]
    assert summary["rows"] == len(audited) and summary["agreement"] == pytest.approx(sum(scores) / len(scores))
    assert summary["agreement_ci"][0] <= summary["agreement"] <= summary["agreement_ci"][1]
    # The audit's batches are in the ledger under their own configuration, and priced apart.
    audit_batches = [c for c in costs if c["configuration"] == "none"]
    assert sum(c["n_rows"] for c in audit_batches) == len(audited)
    assert summary["cost_usd"] == pytest.approx(sum(c["cost_usd"] for c in audit_batches))
    assert {c["configuration"] for c in costs} == {"none", "visionzip@ratio=0.11"}
