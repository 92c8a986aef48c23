"""cluster/ manifests stay runnable: they parse, have the fields their tools need, and their job command uses
flags and a reducer budget that jobs/caption.py accepts today."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

import reducers
from pipeline.config import parse_args
from reducers.accounting import reference_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _caption_args(command: str) -> list[str]:
    words = shlex.split(command)
    script = next(i for i, w in enumerate(words) if w.endswith("jobs/caption.py"))
    return words[script + 1:]


def _check_job(command: str) -> None:
    config = parse_args("caption", _caption_args(command))  # argparse exits on a flag caption.py does not have
    assert config.input.startswith("s3://") and config.output.startswith("s3://")
    assert config.reducer in reducers.available()
    reducers.validate(reference_config("llava-1.5-7b"), config.reducer, visual_tokens=config.visual_tokens,
                      ratio=config.ratio)
    assert config.gpus_per_actor == 1


def test_kuberay_rayjob():
    doc = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    spec = doc["spec"]
    _check_job(spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"], dict)
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert gpu["maxReplicas"] >= parse_args("caption", _caption_args(spec["entrypoint"])).actors[1]


def test_cluster_launcher_yaml_is_valid_for_ray_up():
    doc = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(doc, schema)  # the schema `ray up` validates against
    nodes = doc["available_node_types"]
    assert doc["head_node_type"] in nodes
    gpu_nodes = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 1]
    assert gpu_nodes and all(n["min_workers"] <= n["max_workers"] for n in gpu_nodes)
    assert any("pip install" in c for c in doc["setup_commands"])
    _check_job(doc["metadata"]["job"])
    assert "ray job submit" in doc["metadata"]["job"]


def test_the_check_catches_a_flag_caption_does_not_have():
    with pytest.raises(SystemExit):
        _check_job("python jobs/caption.py --input s3://b/i --output s3://b/o --num-gpus 1")


def test_kuberay_raycronjob_runs_the_rayjob_nightly_without_overlap():
    doc = yaml.safe_load((CLUSTER / "raycronjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayCronJob")
    spec = doc["spec"]
    assert len(spec["schedule"].split()) == 5 and set(spec) == {"schedule", "jobTemplate"}
    job = spec["jobTemplate"]
    _check_job(job["entrypoint"])
    config = parse_args("caption", _caption_args(job["entrypoint"]))
    assert config.retry_errors and config.max_cost_usd > 0
    assert 0 < job["activeDeadlineSeconds"] < 24 * 3600  # a daily schedule: a night ends before the next begins
    assert job["shutdownAfterJobFinishes"] is True
    rayjob = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())["spec"]
    assert job["rayClusterSpec"] == rayjob["rayClusterSpec"]  # one cluster spec to maintain


def test_cronjob_submits_to_an_existing_cluster_with_concurrency_forbidden():
    doc = yaml.safe_load((CLUSTER / "nightly-cronjob.yaml").read_text())
    assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
    spec = doc["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and len(spec["schedule"].split()) == 5
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    command = " ".join(container["command"][2:] + container["args"])
    words = shlex.split(command)
    assert words[:3] == ["ray", "job", "submit"] and "--no-wait" not in words  # Forbid sees the night while it runs
    _check_job(command)
    raycron = yaml.safe_load((CLUSTER / "raycronjob.yaml").read_text())["spec"]["jobTemplate"]["entrypoint"]
    assert _caption_args(command) == _caption_args(raycron)  # both schedules run the same job on the same output
