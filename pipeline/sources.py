"""Input URI + format -> a list of shards (the unit of progress and resume) and, per shard, a table of source rows.

All I/O goes through `pyarrow.fs`, which resolves s3:// (endpoint and keys from the standard AWS_* environment
variables), gs://, file:// and local paths. The filesystem object is resolved once on the driver and shipped to
the read tasks, so workers need no credentials of their own.

Ray's `read_parquet` / `read_webdataset` / `read_images` are not used: `read_images` fails the whole read on one bad
file, and none of them says how many rows a shard holds, which is what lets the driver mark a shard complete.
"""
from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import ConfigError, JobConfig
from pipeline.schema import SOURCE_SCHEMA

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SHARD_EXTENSIONS = {"parquet": (".parquet",), "webdataset": (".tar",), "images": IMAGE_EXTENSIONS}

@dataclass(frozen=True)
class Shard:
    name: str               # path of the shard relative to the input root; the `shard` column of every output row
    format: str             # parquet, webdataset or images
    paths: tuple[str, ...]  # filesystem paths: one file, or the image files of an image-folder shard
    root: str               # input root (image ids are paths relative to it)


def open_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI or local path -> (filesystem, path inside it). Raises ConfigError for an unusable URI."""
    try:
        if "://" in uri:
            return pafs.FileSystem.from_uri(uri)
        return pafs.LocalFileSystem(), posixpath.abspath(uri)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"cannot open {uri}: {e}") from None


def _detect_format(paths: list[str]) -> str:
    for fmt in ("parquet", "webdataset", "images"):
        if any(p.lower().endswith(SHARD_EXTENSIONS[fmt]) for p in paths):
            return fmt
    return "auto"


def list_shards(fs: pafs.FileSystem, root: str, config: JobConfig) -> list[Shard]:
    """Shards of the input, sorted by name. Raises ConfigError for a missing or empty input."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input not found: {config.input}")
    if info.type == pafs.FileType.File:
        files, root = [root], posixpath.dirname(root)
    else:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files = sorted(f.path for f in found if f.type == pafs.FileType.File
                       and not posixpath.basename(f.path).startswith(("_", ".")))
    fmt = _detect_format(files) if config.format == "auto" else config.format
    wanted = [f for f in files if f.lower().endswith(SHARD_EXTENSIONS.get(fmt, ()))]
    if not wanted:
        raise ConfigError(f"input is empty: no {fmt if fmt != 'auto' else 'Parquet, tar or image'} files "
                          f"in {config.input}")
    relative = [posixpath.relpath(f, root) for f in wanted]
    if fmt != "images":
        return [Shard(rel, fmt, (path,), root) for rel, path in zip(relative, wanted)]
    n = config.images_per_shard
    return [Shard(f"images-{i // n:05d}", fmt, tuple(wanted[i:i + n]), root) for i in range(0, len(wanted), n)]


def check_parquet_columns(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> None:
    """Refuse a Parquet input whose first shard lacks the id or image column (read from the footer only)."""
    names = pq.read_schema(shard.paths[0], filesystem=fs).names
    for column in (config.id_column, config.image_column):
        if column not in names:
            raise ConfigError(f"Parquet input {shard.name} has no column {column!r} (columns: {', '.join(names)}); "
                              f"set --{'id' if column == config.id_column else 'image'}-column")


def read_shards(batch: pa.Table, fs: pafs.FileSystem, shards: dict[str, Shard], config: JobConfig) -> pa.Table:
    """Ray map_batches function: a batch of shard names -> all their source rows."""
    return pa.concat_tables([read_shard(fs, shards[name], config) for name in batch.column("shard").to_pylist()])


def read_shard(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> pa.Table:
    """All source rows of one shard (SOURCE_SCHEMA)."""
    reader = {"parquet": _read_parquet, "webdataset": _read_webdataset, "images": _read_images}[shard.format]
    rows = reader(fs, shard, config)
    n = len(rows["id"])
    return pa.table({**rows, "shard": [shard.name] * n, "shard_rows": [n] * n}, schema=SOURCE_SCHEMA)


def _read_parquet(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> dict[str, list]:
    table = pq.read_table(shard.paths[0], filesystem=fs)
    images = table.column(config.image_column)
    if pa.types.is_struct(images.type):  # Hugging Face datasets layout: {bytes, path}
        images = images.combine_chunks().field("bytes")
    questions = (table.column(config.question_column).cast(pa.string()).to_pylist()
                 if config.question_column in table.column_names else [None] * len(table))
    image_list = images.to_pylist()
    return {"id": table.column(config.id_column).cast(pa.string()).to_pylist(), "image": image_list,
            "question": questions, "error": [None if b else "no image bytes in row" for b in image_list]}


def _read_webdataset(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> dict[str, list]:
    """Members sharing a key (the name up to the first dot of the basename) form one sample."""
    samples: dict[str, dict[str, bytes]] = {}
    with fs.open_input_stream(shard.paths[0]) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:  # streaming mode: one pass, no seeks (cheap on object storage)
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            samples.setdefault(posixpath.join(folder, stem), {})[ext.lower()] = tar.extractfile(member).read()
    rows: dict[str, list] = {"id": [], "image": [], "question": [], "error": []}
    for key, parts in samples.items():
        image = next((parts[e] for e in (x.lstrip(".") for x in IMAGE_EXTENSIONS) if e in parts), None)
        rows["id"].append(key)
        rows["image"].append(image)
        rows["question"].append(_json_field(parts.get("json"), config.question_column))
        rows["error"].append(None if image is not None else
                             f"no image in sample (members: {', '.join(sorted(parts))})")
    return rows


def _json_field(raw: bytes | None, name: str) -> str | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw).get(name)
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object: the sample has no question
        return None
    return None if value is None else str(value)


def _read_images(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> dict[str, list]:
    images = []
    for path in shard.paths:
        with fs.open_input_stream(path) as f:
            images.append(f.read())
    n = len(images)
    return {"id": [posixpath.relpath(p, shard.root) for p in shard.paths], "image": images,
            "question": [None] * n, "error": [None] * n}
