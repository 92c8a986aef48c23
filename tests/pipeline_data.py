"""Inputs for the pipeline tests: odd and broken images, Parquet / WebDataset / folder shards, a tiny model, and
real servers (SeaweedFS S3, a Ray head) started on loopback inside the test's network namespace."""
from __future__ import annotations

import io
import json
import os
import random
import socket
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from reference.test_models import LlavaSpec, save_tiny

# A small but complete LLaVA-1.5 layout: 112 px / patch 14 -> 64 visual tokens; 4 LLM layers keep CPU tests fast.
TEST_SPEC = LlavaSpec(image_size=112, llm_layers=4)
VENV_BIN = Path(sys.executable).parent


def save_test_model(path: Path) -> Path:
    if not (path / "config.json").exists():
        save_tiny(str(path), TEST_SPEC)
    return path


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _pattern(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def good_images(n: int, seed: int = 0) -> list[bytes]:
    return [_encode(_pattern(40 + 8 * i, 30 + 5 * i, seed + i), "JPEG") for i in range(n)]


def odd_images() -> dict[str, bytes]:
    """Unusual images that must be converted to RGB and captioned."""
    gif_frames = [Image.new("P", (24, 24), c) for c in (1, 2, 3)]
    sixteen = Image.fromarray((np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60))
    return {
        "cmyk.jpg": _encode(_pattern(32, 32, 7).convert("CMYK"), "JPEG"),
        "gray16.png": _encode(sixteen, "PNG"),
        "alpha.png": _encode(Image.new("RGBA", (20, 20), (255, 0, 0, 128)), "PNG"),
        "palette.png": _encode(_pattern(20, 20, 8).convert("P"), "PNG"),
        "one-pixel.png": _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "animated.gif": _encode(gif_frames[0], "GIF", save_all=True, append_images=gif_frames[1:], duration=50),
    }


def bad_images() -> dict[str, bytes]:
    """Inputs nothing can open: each must become an error row."""
    jpeg = good_images(1, seed=11)[0]
    return {"truncated.jpg": jpeg[: len(jpeg) // 2], "zero.jpg": b"", "text.jpg": b"this is not an image\n"}


def bomb_png(side: int = 12000) -> bytes:
    """A decompression bomb below PIL's own limit: side x side pixels (144 M at 12000) in a PNG of a few hundred KB;
    decoded to RGB it would take 3 bytes a pixel."""
    return _encode(Image.new("1", (side, side), 1), "PNG")


def hostile_samples() -> dict[str, bytes]:
    """Tar member names a careless reader would act on: a path out of the shard, a 10,000-character key."""
    good = good_images(3, seed=21)
    return {"../escape.jpg": good[0], "a/../../up.jpg": good[1], f"{'k' * 10_000}.jpg": good[2]}


def write_parquet_shard(path: Path, samples: dict[str, bytes], questions: dict[str, str] | None = None) -> None:
    ids = list(samples)
    columns = {"id": ids, "image": [samples[i] for i in ids]}
    if questions is not None:
        columns["question"] = [questions.get(i) for i in ids]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def write_tar_shard(path: Path, samples: dict[str, bytes], questions: dict[str, str] | None = None) -> None:
    """WebDataset: `key.ext` image members, plus `key.json` with the question when one is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in samples.items():
            key, ext = name.rsplit(".", 1)
            members = {f"{key}.{ext}": data}
            if questions and name in questions:
                members[f"{key}.json"] = json.dumps({"question": questions[name]}).encode()
            for member, payload in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port() -> int:
    """A free port P in 20000-29999 whose P + 10000 is free too: SeaweedFS serves gRPC on P + 10000."""
    while True:
        port = random.randrange(20000, 30000)
        if _is_free(port) and _is_free(port + 10000):
            return port


def _wait_port(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {seconds} s")


@contextmanager
def seaweedfs(workdir: Path, bucket: str):
    """A real S3 server on loopback; yields the AWS_* environment that points every client at it."""
    with seaweedfs_server(workdir, bucket) as (env, _):
        yield env


@contextmanager
def seaweedfs_server(workdir: Path, bucket: str):
    """seaweedfs(), also yielding the server process (to stop and resume it: an outage)."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys = {"identities": [{"name": "test", "credentials": [{"accessKey": "trimlens", "secretKey": "trimlens-secret"}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    (workdir / "keys.json").write_text(json.dumps(keys))
    ports: set[int] = set()
    while len(ports) < 4:
        ports.add(free_port())
    s3, master, volume, filer = ports
    command = [str(VENV_BIN / "weed"), "mini", f"-dir={workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false", f"-s3.port={s3}",
               f"-s3.config={workdir / 'keys.json'}", f"-bucket={bucket}", f"-master.port={master}",
               f"-volume.port={volume}", f"-filer.port={filer}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    with open(workdir / "weed.log", "wb") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(s3, 60)
        env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3}", "AWS_ACCESS_KEY_ID": "trimlens",
               "AWS_SECRET_ACCESS_KEY": "trimlens-secret", "AWS_REGION": "us-east-1"}
        _wait_bucket(env, bucket)
        yield env, server
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_bucket(env: dict[str, str], bucket: str) -> None:
    """The S3 port opens before the bucket exists: wait until it does."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key=env["AWS_ACCESS_KEY_ID"],
                           secret_key=env["AWS_SECRET_ACCESS_KEY"], region=env["AWS_REGION"])
    deadline = time.monotonic() + 60
    while True:
        try:
            if fs.get_file_info(bucket).type == pafs.FileType.Directory:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"bucket {bucket} not served after 60 s")
        time.sleep(0.3)


@contextmanager
def ray_head(env: dict[str, str], cpus: int = 2):
    """`ray start --head` with `env` in the cluster's environment (as credentials would be on a real cluster);
    yields the jobs API address."""
    port, dashboard = free_port(), free_port()
    full_env = {**os.environ, **env, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(VENV_BIN / "ray"), "start", "--head", f"--num-cpus={cpus}", "--disable-usage-stats",
                    f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    "--include-dashboard=true"], env=full_env, check=True, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard}", full_env
    finally:
        subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=full_env, capture_output=True)
