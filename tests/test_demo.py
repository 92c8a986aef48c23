"""`make demo`, checked as a person would check it: the bundled model captions the bundled sample scenes through the
real entry point (`jobs/caption.py`, a local Ray in this test's loopback namespace), and the captions must be the
scenes' ground truth (all but at most one of the six, see below), which the scene generator gives back from the seed in each file name."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.bundled import BUNDLED_MODEL_DIR
from pipeline.config import SAMPLES
from reducers.shape import ModelShape
from reference.scenes import Scene, caption, caption_scores, f1, generate_scene
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parents[1]


def demo_args() -> list[str]:
    """The reducer flags `make demo` passes (DEMO_ARGS in the Makefile)."""
    line = next(line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("DEMO_ARGS"))
    return shlex.split(line.split("=", 1)[1])


def scene_of(sample_id: str) -> Scene:
    return generate_scene(int(re.fullmatch(r"scene-(\d+)\.png", sample_id).group(1)))


def truth(sample_id: str) -> str:
    return caption(scene_of(sample_id))


@pytest.mark.parametrize("reducer_args", [[], demo_args()], ids=["none", "demo"])
def test_the_demo_captions_every_sample_scene_correctly(tmp_path, reducer_args):
    assert "--reducer" in demo_args()  # the demo shows a reduction, not the unreduced model
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "caption.py"), "--output", str(out), *reducer_args],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = pq.read_table(out / "results").to_pylist()
    costs = pq.read_table(out / "costs").to_pylist()
    full = ModelShape.from_config(AutoConfig.from_pretrained(BUNDLED_MODEL_DIR)).patches  # 144 visual tokens
    assert sorted(r["id"] for r in results) == sorted(p.name for p in SAMPLES.glob("*.png"))
    # The reference model is right on 98 % of held-out items, not all: unreduced it names scene-50000002's green cross
    # a green square (measured on transformers 5.23 and 5.24, bf16 and fp32). Garbage scores 0 on every scene.
    exact = [r["id"] for r in results if r["text"] == truth(r["id"])]
    scores = [f1(*caption_scores(r["text"], scene_of(r["id"]))) for r in results]
    assert len(exact) >= len(results) - 1 and min(scores) >= 0.7, [(r["id"], r["text"]) for r in results]
    assert all(r["error"] is None and r["visual_tokens_in"] == full for r in results)
    assert sum(c["visual_tokens_in"] for c in costs) == full * len(results)
    kept = sum(r["visual_tokens_kept"] for r in results) / len(results)
    if reducer_args:
        assert kept == pytest.approx(float(reducer_args[reducer_args.index("--ratio") + 1]) * full, abs=0.5)
        assert sum(c["flops_total"] for c in costs) < sum(c["flops_total_unreduced"] for c in costs)
    else:
        assert kept == full
    assert f"{len(results)} images (0 errors)" in done.stdout and f"{full * len(results)} visual tokens in" in done.stdout
