"""The memory rule (reducers/memory.py) against measured memory, and --batch-size auto against the rule.

Measured on CPU only: this project's machines have no GPU, so the rule's GPU side (torch.cuda.max_memory_allocated
against the same prediction) is not tested here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import reducers
from pipeline.config import AUTO, ConfigError, Configuration, parse_args
from pipeline.job import fit_batch, load_model_config, resolve_batch_size
from reducers import memory
from reducers.accounting import reference_config

PROBE = Path(__file__).resolve().parent / "memory_probe.py"
# The prediction is an upper bound: it counts one fp32 attention-score matrix per layer and every part of a layer as
# alive at once, where fused SDPA kernels never hold the scores. Measured on the probe's model it is 1.3x (none) to
# 2.0x (VisionZip at 1/9, whose remaining memory is mostly the vision tower's) the measured per-row peak, which is
# linear in the batch to 2 % once glibc returns every large block (MALLOC_MMAP_THRESHOLD_ fixed).
LOOSEST = 2.5
RATIOS = (1.0, 0.33, 0.11)


def test_sizes_read_in_decimal_and_binary_units_and_refuse_anything_else():
    assert memory.parse_size("24GiB") == 24 * 1024 ** 3
    assert memory.parse_size("4G") == memory.parse_size("4GB") == 4 * 10 ** 9
    assert memory.parse_size("512MiB") == 512 * 1024 ** 2 and memory.parse_size("1.5 kib") == 1536
    assert memory.parse_size(1000) == memory.parse_size("1000") == 1000
    for bad in ("", "GiB", "-4G", "4 apples", "0.1", "4GiBs", "1e9"):
        with pytest.raises(ValueError, match="size"):
            memory.parse_size(bad)


def measured_and_predicted(reducer: str, ratio: float) -> tuple[float, int]:
    """(peak RSS per row measured in a fresh process between its smallest and largest batch, predicted per row)."""
    # A fixed mmap threshold: glibc otherwise raises it after each large free and keeps the next large blocks on its
    # heap, so the resident set would keep freed memory and grow faster than the live tensors do.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run([sys.executable, str(PROBE), reducer, str(ratio)], capture_output=True, text=True,
                          check=True, timeout=600, env=environment)
    probe = json.loads(done.stdout)
    peaks = {int(rows): peak for rows, peak in probe["peaks"].items()}
    small, large = min(peaks), max(peaks)
    budget = {} if reducer == "none" else {"ratio": ratio}
    predicted = memory.row_memory(probe["config"], reducer, budget, probe["text_tokens"], probe["new_tokens"],
                                  dtype_bytes=4).total
    return (peaks[large] - peaks[small]) / (large - small), predicted


def test_predicted_row_memory_bounds_the_measured_peak_within_a_factor_and_shrinks_with_the_tokens():
    cases = [("none", 1.0), ("visionzip", 0.33), ("visionzip", 0.11), ("fastv", 0.33)]
    results = {case: measured_and_predicted(*case) for case in cases}
    for case, (measured, predicted) in results.items():
        assert measured <= predicted <= LOOSEST * measured, (case, measured, predicted)
    vz = [results[("none", 1.0)], results[("visionzip", 0.33)], results[("visionzip", 0.11)]]
    assert vz[0][0] > vz[1][0] > vz[2][0] and vz[0][1] > vz[1][1] > vz[2][1]  # measured and predicted both shrink
    # FastV keeps its whole cache and activations up to its layer K, so it saves less than VisionZip at 1/3.
    assert results[("fastv", 0.33)][1] > results[("visionzip", 0.33)][1]


@pytest.mark.parametrize("method", [m for m in reducers.available() if m != "none"])
def test_auto_batch_is_the_largest_the_rule_allows_and_grows_as_tokens_shrink(method):
    config = reference_config("llava-1.5-7b")
    weights = memory.weight_bytes(config, dtype_bytes=2)
    assert 6.5e9 < weights / 2 < 7.5e9  # LLaVA-1.5-7B: about 7 B parameters
    batches = []
    for ratio in RATIOS:
        fit = memory.largest_batch(24 * 1024 ** 3, weights, memory.row_memory(config, method, {"ratio": ratio},
                                                                             text_tokens=40, new_tokens=60,
                                                                             dtype_bytes=2))
        assert fit.needed(fit.batch_size) <= fit.usable < fit.needed(fit.batch_size + 1)
        batches.append(fit.batch_size)
    assert batches[0] < batches[1] < batches[2], batches


def test_auto_through_the_job_settings_resolves_before_any_model_loads(tmp_path):
    job = parse_args("caption", ["--batch-size", "auto", "--memory-per-actor", "40MiB",
                                 "--output", str(tmp_path / "out")])
    model_config = load_model_config(job.model)
    batches = []
    for ratio in RATIOS:
        configured = dataclasses.replace(job, reducer="visionzip", ratio=ratio)
        resolved, rule = resolve_batch_size(configured, model_config)
        fit = fit_batch(configured, model_config, configured.configuration())
        assert resolved.batch_size == rule["batch_size"] == fit.batch_size >= 1
        assert fit.needed(resolved.batch_size) <= fit.usable and rule["memory_per_actor"] == 40 * 1024 ** 2
        batches.append(resolved.batch_size)
    assert batches[0] < batches[1] < batches[2], batches
    audited = dataclasses.replace(job, reducer="visionzip", ratio=0.11, audit_share=0.5)  # audited rows run unreduced
    unreduced = fit_batch(job, model_config, Configuration("none")).batch_size
    assert resolve_batch_size(audited, model_config)[0].batch_size == unreduced < batches[2]
    given = dataclasses.replace(job, batch_size=8)
    assert resolve_batch_size(given, model_config) == (given, None)  # a number is kept as given


def test_the_planner_gives_each_configuration_its_own_auto_batch(tmp_path):
    from pipeline.planner import PlanConfig, configurations

    job = parse_args("caption", ["--batch-size", AUTO, "--memory-per-actor", "40MiB"])
    model_config = load_model_config(job.model)
    chosen, _ = configurations(model_config, PlanConfig(methods=("visionzip",), ratios=RATIOS[1:]))
    sized = {c.label: fit_batch(job, model_config, c).batch_size for c in chosen}
    assert sized["none"] < sized["visionzip@ratio=0.33"] < sized["visionzip@ratio=0.11"]
    with pytest.raises(ConfigError, match="--memory-per-actor 4.0 MiB does not hold one row at --reducer none"):
        fit_batch(dataclasses.replace(job, memory_per_actor=4 * 1024 ** 2), model_config, Configuration("none"))
