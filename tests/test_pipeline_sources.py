"""Sources (shard listing, row ids, formats) and the decode stage (odd images -> RGB, bad ones -> error rows)."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import ConfigError, JobConfig
from pipeline.decode import ImageRejected, load_processor, prepare, to_rgb, unpack
from pipeline.schema import PREPARED_SCHEMA, SOURCE_SCHEMA
from pipeline.sources import list_shards, open_uri, read_shard
from pipeline_data import (bad_images, bomb_png, good_images, hostile_samples, odd_images, save_test_model,
                           write_parquet_shard, write_tar_shard)

ROOT = Path(__file__).resolve().parents[1]
LIMIT = JobConfig().max_image_pixels


def _shards(uri: str, **settings):
    config = JobConfig(input=uri, **settings)
    fs, root = open_uri(uri, "--input")
    return fs, list_shards(fs, root, config), config


def _read(fs, shard, config) -> pa.Table:
    return pa.concat_tables(read_shard(fs, shard, config))


def test_parquet_shards_ids_and_questions(tmp_path):
    images = good_images(3)
    write_parquet_shard(tmp_path / "in" / "b.parquet", {"x1": images[0]}, {"x1": "Q?"})
    write_parquet_shard(tmp_path / "in" / "sub" / "a.parquet", {"y1": images[1], "y2": images[2]})
    (tmp_path / "in" / "_SUCCESS").write_text("")  # not a shard
    fs, shards, config = _shards(str(tmp_path / "in"))
    assert [s.name for s in shards] == ["b.parquet", "sub/a.parquet"] and {s.format for s in shards} == {"parquet"}
    table = _read(fs, shards[1], config)
    assert table.schema == SOURCE_SCHEMA
    assert table.column("id").to_pylist() == ["y1", "y2"] and table.column("shard_rows").to_pylist() == [2, 2]
    assert table.column("question").to_pylist() == [None, None]
    assert _read(fs, shards[0], config).column("question").to_pylist() == ["Q?"]


def test_webdataset_keys_json_questions_and_samples_without_image(tmp_path):
    samples = {"s/000.jpg": good_images(1)[0], "s/001.png": good_images(1, seed=3)[0]}
    write_tar_shard(tmp_path / "00000.tar", samples, {"s/001.png": "How many?"})
    with tarfile.open(tmp_path / "00001.tar", "w") as tar:  # a sample with only a caption: no image
        info = tarfile.TarInfo("lonely.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    fs, shards, config = _shards(f"file://{tmp_path}")
    assert [s.name for s in shards] == ["00000.tar", "00001.tar"] and shards[0].format == "webdataset"
    first = _read(fs, shards[0], config).to_pylist()
    assert [(r["id"], r["question"], r["error"]) for r in first] == [("s/000", None, None),
                                                                    ("s/001", "How many?", None)]
    assert first[0]["image"] == samples["s/000.jpg"]
    lonely = _read(fs, shards[1], config).to_pylist()
    assert lonely[0]["id"] == "lonely" and "no image" in lonely[0]["error"]


def test_shards_stream_in_chunks_and_the_last_carries_the_row_count(tmp_path):
    write_tar_shard(tmp_path / "t.tar", {f"k{i}.jpg": b for i, b in enumerate(good_images(5))})
    write_parquet_shard(tmp_path / "p" / "p.parquet", {f"k{i}": b for i, b in enumerate(good_images(5))})
    for uri in (str(tmp_path / "t.tar"), str(tmp_path / "p")):
        fs, (shard,), config = _shards(uri, batch_size=2)
        chunks = list(read_shard(fs, shard, config))
        assert [c.num_rows for c in chunks] == [2, 2, 1]
        assert [c.column("shard_rows").to_pylist() for c in chunks] == [[None, None], [None, None], [5]]
        assert [i for c in chunks for i in c.column("id").to_pylist()] == [f"k{i}" for i in range(5)]


def test_image_folder_ids_are_relative_paths_and_shards_are_chunks(tmp_path):
    for i, data in enumerate(good_images(5)):
        (tmp_path / ("deep" if i % 2 else ".")).mkdir(exist_ok=True)
        (tmp_path / ("deep" if i % 2 else ".") / f"img{i}.jpg").write_bytes(data)
    (tmp_path / "notes.txt").write_text("ignored")
    fs, shards, config = _shards(str(tmp_path), images_per_shard=2)
    assert [s.name for s in shards] == ["images-00000", "images-00001", "images-00002"]
    ids = [i for s in shards for i in _read(fs, s, config).column("id").to_pylist()]
    assert sorted(ids) == ["deep/img1.jpg", "deep/img3.jpg", "img0.jpg", "img2.jpg", "img4.jpg"]


def test_format_override_and_single_file_input(tmp_path):
    write_parquet_shard(tmp_path / "only.parquet", {"a": good_images(1)[0]})
    fs, shards, _ = _shards(str(tmp_path / "only.parquet"))
    assert [s.name for s in shards] == ["only.parquet"]
    with pytest.raises(ConfigError, match="empty"):
        _shards(str(tmp_path), format="webdataset")


def test_missing_input_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        _shards(str(tmp_path / "missing"))


@pytest.mark.parametrize("name", sorted(odd_images()))
def test_odd_images_become_rgb(name):
    image = to_rgb(odd_images()[name], LIMIT)
    assert image.mode == "RGB" and image.size[0] >= 1


def test_sixteen_bit_keeps_its_range_and_alpha_goes_over_white():
    gray = to_rgb(odd_images()["gray16.png"], LIMIT)
    assert max(gray.getextrema()[0]) > 200  # not clipped to the low byte, not all black
    assert to_rgb(odd_images()["alpha.png"], LIMIT).getpixel((0, 0)) == (255, 127, 127)


@pytest.mark.parametrize("name", sorted(bad_images()))
def test_bad_images_raise(name):
    with pytest.raises(Exception):
        to_rgb(bad_images()[name], LIMIT)


def test_prepare_turns_each_row_into_tensors_or_an_error(tmp_path):
    model = str(save_test_model(tmp_path / "model"))
    samples = {**odd_images(), **bad_images(), "good.jpg": good_images(1)[0], "bomb.png": bomb_png()}
    source = pa.table({"id": list(samples), "shard": ["s"] * len(samples), "shard_rows": [len(samples)] * len(samples),
                       "image": list(samples.values()), "question": ["Own?"] + [None] * (len(samples) - 1),
                       "error": [None] * len(samples)}, schema=SOURCE_SCHEMA)
    for task in ("caption", "vqa"):
        out = prepare(source, JobConfig(task=task, model=model, question="Default?"))
        assert out.schema == PREPARED_SCHEMA and out.num_rows == len(samples)
        rows = {r["id"]: r for r in out.to_pylist()}
        for name in bad_images():
            assert rows[name]["error"].startswith("cannot decode image") and rows[name]["inputs"] is None
        bomb = rows["bomb.png"]
        assert bomb["error"].startswith("image too large: 12000x12000") and bomb["inputs"] is None
        for name in [*odd_images(), "good.jpg"]:
            arrays = unpack(rows[name]["inputs"])
            assert rows[name]["error"] is None and arrays["pixel_values"].shape == (3, 112, 112)
            assert (arrays["input_ids"] == load_processor(model).tokenizer.convert_tokens_to_ids("<image>")).sum() == 64
        questions = [r["question"] for r in out.to_pylist()]
        others = [None if task == "caption" else "Default?"] * (len(samples) - 1)
        assert questions == [None if task == "caption" else "Own?", *others]


def test_tar_member_names_are_ids_never_paths(tmp_path):
    samples = hostile_samples()
    write_tar_shard(tmp_path / "in" / "00000.tar", samples)
    fs, (shard,), config = _shards(str(tmp_path / "in"))
    rows = _read(fs, shard, config).to_pylist()
    assert [r["id"] for r in rows] == [name.rsplit(".", 1)[0] for name in samples]  # kept verbatim, 10k chars too
    assert [r["image"] for r in rows] == list(samples.values()) and all(r["error"] is None for r in rows)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["00000.tar", "in"]  # nothing was extracted anywhere


def test_integer_ids_are_read_as_text(tmp_path):
    images = good_images(2)
    pq.write_table(pa.table({"id": [7, 1_000_000_000_000], "image": images}), tmp_path / "ints.parquet")
    fs, (shard,), config = _shards(str(tmp_path / "ints.parquet"))
    assert _read(fs, shard, config).column("id").to_pylist() == ["7", "1000000000000"]


def test_a_bomb_is_refused_from_its_header_and_a_big_jpeg_is_decoded_smaller():
    with pytest.raises(ImageRejected, match=r"12000x12000 = 144.0 M pixels, above --max-image-pixels 25000000"):
        to_rgb(bomb_png(), LIMIT)
    jpeg = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 10, 10)).save(jpeg, "JPEG")
    png = io.BytesIO()
    Image.new("RGB", (400, 300), (200, 10, 10)).save(png, "PNG")
    assert to_rgb(jpeg.getvalue(), 400 * 300).size == (400, 300)
    assert to_rgb(jpeg.getvalue(), 40_000).size == (200, 150)  # libjpeg's 1/2 scale: the mildest that fits
    assert to_rgb(jpeg.getvalue(), 2_000).size == (50, 38)      # 1/8
    with pytest.raises(ImageRejected, match="400x300"):
        to_rgb(jpeg.getvalue(), 1_000)                          # even 1/8 is too big
    with pytest.raises(ImageRejected, match="400x300"):
        to_rgb(png.getvalue(), 40_000)                          # no reduced decode for PNG


ERRORS_OF_ONE_RUN = """
import json, sys
from pipeline.decode import error_text, to_rgb
sys.path.insert(0, "tests")
from pipeline_data import bad_images, bomb_png
out = {}
for name, data in {**bad_images(), "bomb.png": bomb_png()}.items():
    try:
        to_rgb(data, 25_000_000)
    except Exception as e:
        out[name] = error_text(e)
print(json.dumps(out))
"""


def test_error_texts_are_the_same_in_every_run():
    runs = [json.loads(subprocess.run([sys.executable, "-c", ERRORS_OF_ONE_RUN], cwd=ROOT, capture_output=True,
                                      text=True, check=True).stdout) for _ in range(2)]
    assert runs[0] == runs[1] and sorted(runs[0]) == sorted([*bad_images(), "bomb.png"])
    assert not any(re.search(r"0x[0-9a-f]{6,}", text) for text in runs[0].values())  # no object addresses
    assert runs[0]["text.jpg"] == "cannot decode image: not an image format PIL can read"
    assert runs[0]["truncated.jpg"].startswith("cannot decode image: OSError: image file is truncated")
