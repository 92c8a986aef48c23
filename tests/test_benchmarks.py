"""Every benchmark still starts: its imports resolve and its command line parses.

The benchmarks are run by hand, not in CI (their figures need a quiet machine), so an API they use can be renamed
without a test noticing; the shared model shapes in benchmarks/prefill.py once broke that way. `--help` imports the
module and builds its parser, and starts neither Ray nor a model.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")


def test_the_benchmarks_are_found():
    assert {"e2e", "equal_memory", "planner_check", "prefill"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_starts(name):
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")


@pytest.mark.parametrize(("flags", "dtype"), [([], torch.bfloat16), (["--llava-7b"], torch.float16),
                                              (["--dtype", "fp32"], torch.float32),
                                              (["--llava-7b", "--dtype", "bf16"], torch.bfloat16)])
def test_model_benchmarks_take_the_dtype_asked_for(flags, dtype):
    """--dtype overrides the shapes' default: fp32 is what a CPU without bf16 instructions runs at a usable speed."""
    from benchmarks.prefill import add_shared_arguments, setup

    parser = argparse.ArgumentParser()
    add_shared_arguments(parser, repeats=1)
    assert setup(parser.parse_args(flags))[1] is dtype
