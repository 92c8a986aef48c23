"""Pipeline overhead: the same model and images through (a) the Ray Data job pipeline with one actor and (b) a bare
Python loop (decode, processor, generate), in one run. Prints images/s of each and their ratio (target >= 0.95).

    scripts/netns-run .venv/bin/python benchmarks/runner_throughput.py [--images 128] [--batch-size 8] [--max-new-tokens 8]

The pipeline decodes on other cores while the actor generates; the bare loop does both in turn. "model alone"
(the loop's generate calls only) is what one actor could reach with decoding entirely hidden.
Throughput is steady state: the clock starts when the first batch is out (model loaded, Ray started) and stops at
the last; both sides skip the same first batch. End-to-end times, startup included, are printed too. The model
runs with one thread on both sides (a CPU actor asks Ray for half a CPU, so it gets one thread).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.actor import TORCH_DTYPES, load_model  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402
from pipeline.decode import load_processor, prompt_text, to_rgb  # noqa: E402
from pipeline.job import build_dataset, plan  # noqa: E402
from reference.test_models import save_tiny  # noqa: E402


def write_images(folder: Path, n: int) -> None:
    """Camera-sized JPEGs (640x480) with content, so decoding costs what it does on real data."""
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)


@dataclass
class Timing:
    steady_s: float        # from the first batch out to the last
    total_s: float         # end to end: model load (and Ray start) included
    images: int            # images after the first batch
    generate_s: float = 0  # bare loop only: time inside generate after the first batch

    @property
    def rate(self) -> float:
        return self.images / self.steady_s


def bare_loop(config: JobConfig, files: list[Path]) -> Timing:
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = load_model(config.model, TORCH_DTYPES[config.dtype], on_gpu=False)
    processor = load_processor(config.model)
    prompt = prompt_text(processor, config.prompt)
    first_done, generating = None, 0.0
    for i in range(0, len(files), config.batch_size):
        chunk = files[i:i + config.batch_size]
        images = [to_rgb(f.read_bytes(), config.max_image_pixels) for f in chunk]
        inputs = processor(images=images, text=[prompt] * len(chunk), padding=True, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        began = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=config.max_new_tokens, do_sample=False)
        if first_done is None:
            first_done = time.perf_counter()
        else:
            generating += time.perf_counter() - began
    end = time.perf_counter()
    return Timing(end - first_done, end - start, len(files) - config.batch_size, generating)


def pipeline(config: JobConfig) -> Timing:
    """The job's own plan, dataset and sink."""
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False)
    job = plan(config)
    first_done, after_first = None, 0
    # batches of the model's batch size, so the first one out is what the bare loop's first batch is
    for out in build_dataset(config, job.input_fs, job.pending).iter_batches(batch_size=config.batch_size,
                                                                              batch_format="pyarrow"):
        job.sink.add(out)
        if first_done is None:
            first_done = time.perf_counter()
        else:
            after_first += len(out)
    end = time.perf_counter()
    ray.shutdown()
    return Timing(end - first_done, end - start, after_first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        write_images(folder, args.images)
        # LLaVA-1.5's token count (576 visual tokens), so the model's share of the work is that of a real job
        model = save_tiny(str(Path(tmp) / "model"))
        config = JobConfig(input=str(folder), output=str(Path(tmp) / "out"), model=model, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, images_per_shard=args.batch_size)
        files = sorted(folder.glob("*.jpg"))
        # bare loop, pipeline, bare loop again: on a shared machine the load drifts, so the loop is measured on both
        # sides of the pipeline and averaged
        before = bare_loop(config, files)
        piped = pipeline(config)
        after = bare_loop(config, files)
    loop_rate = (before.rate + after.rate) / 2
    model_rate = (before.images / before.generate_s + after.images / after.generate_s) / 2
    print(f"model: tiny random-weight LLaVA-1.5 (576 visual tokens, 32 LLM layers), {config.dtype}, {args.images} images "
          f"640x480 JPEG, batch {args.batch_size}, {args.max_new_tokens} new tokens, reducer none")
    print(f"bare loop  : {loop_rate:6.2f} images/s steady state (runs before / after the pipeline: "
          f"{before.rate:.2f} / {after.rate:.2f}; end to end {args.images / before.total_s:.2f})")
    print(f"pipeline   : {piped.rate:6.2f} images/s steady state (end to end {args.images / piped.total_s:.2f}, "
          f"{piped.total_s:.1f} s with Ray start)")
    print(f"model alone: {model_rate:6.2f} images/s (the bare loop's generate calls only)")
    print(f"ratio pipeline / bare loop: {piped.rate / loop_rate:.3f} (target >= 0.95); "
          f"pipeline / model alone: {piped.rate / model_rate:.3f}")


if __name__ == "__main__":
    main()
