"""Input URI + format -> a list of shards (the unit of progress and resume) and a Ray datasource of their rows.

All I/O goes through `pyarrow.fs`, which resolves s3:// (endpoint and keys from the standard AWS_* environment
variables), gs://, file:// and local paths. The filesystem object is resolved once on the driver and shipped to
the read tasks; keys that came from the environment are not part of it (pyarrow reads them again where it runs,
an S3 read task without them gets ACCESS_DENIED), so the workers need the same AWS_* variables, as a cluster
started with them has.
"""
from __future__ import annotations

import functools
import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from pipeline import retry
from pipeline.config import ConfigError, JobConfig
from pipeline.schema import SHARD_FAILED, SOURCE_SCHEMA

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SHARD_EXTENSIONS = {"parquet": (".parquet",), "webdataset": (".tar",), "images": IMAGE_EXTENSIONS}

@dataclass(frozen=True)
class Shard:
    name: str               # path of the shard relative to the input root; the `shard` column of every output row
    format: str             # parquet, webdataset or images
    paths: tuple[str, ...]  # filesystem paths: one file, or the image files of an image-folder shard
    root: str               # input root (image ids are paths relative to it)
    only_ids: frozenset[str] | None = None  # --retry-errors: read just these rows (the shard's error rows)


def open_uri(uri: str, flag: str) -> tuple[pafs.FileSystem, str]:
    """URI or local path -> (filesystem, path inside it). Raises ConfigError naming `flag` for an unusable URI."""
    try:
        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
            return retry.fail_fast(fs), path
        return pafs.LocalFileSystem(), posixpath.abspath(uri)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"cannot open {flag} {uri}: {e}") from None


def _detect_format(paths: list[str]) -> str:
    for fmt in ("parquet", "webdataset", "images"):
        if any(p.lower().endswith(SHARD_EXTENSIONS[fmt]) for p in paths):
            return fmt
    return "auto"


def list_shards(fs: pafs.FileSystem, root: str, config: JobConfig) -> list[Shard]:
    """Shards of the input, sorted by name. Raises ConfigError for a missing or empty input."""
    info = retry.call(lambda: fs.get_file_info(root), f"looking up {config.input}", config.io_retry_seconds)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"input not found: --input {config.input}")
    if info.type == pafs.FileType.File:
        files, root = [root], posixpath.dirname(root)
    else:
        found = retry.call(lambda: fs.get_file_info(pafs.FileSelector(root, recursive=True)),
                           f"listing {config.input}", config.io_retry_seconds)
        files = sorted(f.path for f in found if f.type == pafs.FileType.File
                       and not posixpath.basename(f.path).startswith(("_", ".")))
    fmt = _detect_format(files) if config.format == "auto" else config.format
    wanted = [f for f in files if f.lower().endswith(SHARD_EXTENSIONS.get(fmt, ()))]
    if not wanted:
        raise ConfigError(f"input is empty: no {fmt if fmt != 'auto' else 'Parquet, tar or image'} files "
                          f"in --input {config.input}" + (f" (--format {fmt})" if config.format != "auto" else ""))
    relative = [posixpath.relpath(f, root) for f in wanted]
    if fmt != "images":
        return [Shard(rel, fmt, (path,), root) for rel, path in zip(relative, wanted)]
    n = config.images_per_shard
    return [Shard(f"images-{i // n:05d}", fmt, tuple(wanted[i:i + n]), root) for i in range(0, len(wanted), n)]


def check_first_shard(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> None:
    """Refuse an input whose first shard cannot be opened (a Parquet footer that is not one, a file that is not a
    tar) or, for Parquet, lacks the id or image column. Reads only the footer / the first tar header."""
    check = {"parquet": _check_parquet, "webdataset": _check_tar}.get(shard.format)
    if check is not None:
        retry.call(lambda: check(fs, shard, config), f"opening {shard.name}", config.io_retry_seconds)


def _check_parquet(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> None:
    try:
        names = pq.read_schema(shard.paths[0], filesystem=fs).names
    except pa.ArrowInvalid as e:
        raise ConfigError(f"Parquet input {shard.name} cannot be read (--input): {str(e).splitlines()[0]}") from None
    for column in (config.id_column, config.image_column):
        if column not in names:
            raise ConfigError(f"Parquet input {shard.name} has no column {column!r} (columns: {', '.join(names)}); "
                              f"set --{'id' if column == config.id_column else 'image'}-column")


def _check_tar(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> None:
    with fs.open_input_stream(shard.paths[0]) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.next()
        except tarfile.TarError as e:
            raise ConfigError(f"WebDataset input {shard.name} is not a readable tar file (--input): {e}") from None


class ShardUnreadable(ValueError):
    """The shard as a whole cannot be read (its rows are not there to turn into error rows)."""


class ShardSource(Datasource):
    """Ray Data datasource: one read task per shard, streaming the shard's rows in chunks (never a whole shard in
    memory). Ray's own readers are not used: `read_images` fails the whole read on one bad file, and none of them
    says how many rows a shard holds, which is what lets the driver mark a shard complete."""

    def __init__(self, fs: pafs.FileSystem, shards: list[Shard], config: JobConfig):
        super().__init__()
        self.fs, self.shards, self.config = fs, shards, config

    def estimate_inmemory_data_size(self) -> None:
        return None  # unknown until read: images are encoded

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        # One task per shard whatever `parallelism` asks: the shard is the unit of progress.
        return [ReadTask(functools.partial(read_shard, self.fs, shard, self.config),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=shard.paths))
                for shard in self.shards]


def read_shard(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> Iterator[pa.Table]:
    """The shard's rows (SOURCE_SCHEMA) in tables of --batch-size rows. `shard_rows` is null except on the last
    table, which carries the shard's row count: a tar's count is known only once it has been read through. A shard
    that cannot be read (a corrupt Parquet footer, a broken tar, a missing column, a file gone since the listing)
    ends with one row whose `shard_rows` is SHARD_FAILED and whose `error` says why: the driver records it as a
    failed shard and drops what it got of it, and the other shards go on. An outage still fails the job."""
    rows = {"parquet": _parquet_rows, "webdataset": _webdataset_rows, "images": _image_rows}[shard.format]
    fs = retry.fail_fast(fs)  # shipped from the driver: pickling dropped the S3 retry strategy
    pending: list[dict[str, Any]] = []
    count = 0
    try:
        for row in retry.resumable(lambda: rows(fs, shard, config), f"reading {shard.name}", config.io_retry_seconds):
            if shard.only_ids is not None and row["id"] not in shard.only_ids:
                continue
            pending.append(row)
            count += 1
            if len(pending) > config.batch_size:  # hold one row back: the last table must not be empty
                yield _table(pending[:config.batch_size], shard, None)
                pending = pending[config.batch_size:]
    except (pa.ArrowException, tarfile.TarError, ShardUnreadable, OSError) as e:
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
        yield _table([{"id": "", "image": None, "question": None, "error": reason}], shard, SHARD_FAILED)
        return
    if pending:
        yield _table(pending, shard, count)


def _table(rows: list[dict[str, Any]], shard: Shard, shard_rows: int | None) -> pa.Table:
    return pa.Table.from_pylist([{**r, "shard": shard.name, "shard_rows": shard_rows} for r in rows],
                                schema=SOURCE_SCHEMA)


def _row(key: str, image: bytes | None, question: str | None, missing: str) -> dict[str, Any]:
    return {"id": key, "image": image, "question": question, "error": None if image else missing}


def _parquet_rows(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> Iterator[dict[str, Any]]:
    with fs.open_input_file(shard.paths[0]) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        for column in (config.id_column, config.image_column):
            if column not in names:
                raise ShardUnreadable(f"no column {column!r} (columns: {', '.join(names)})")
        columns = [c for c in (config.id_column, config.image_column, config.question_column) if c in names]
        for batch in parquet.iter_batches(batch_size=max(config.batch_size, 64), columns=columns):
            images = batch.column(config.image_column)
            if pa.types.is_struct(images.type):  # Hugging Face datasets layout: {bytes, path}
                images = images.field("bytes")
            questions = (batch.column(config.question_column).cast(pa.string()).to_pylist()
                         if config.question_column in names else [None] * batch.num_rows)
            ids = batch.column(config.id_column).cast(pa.string()).to_pylist()
            for key, image, question in zip(ids, images.to_pylist(), questions):
                yield _row(key, image, question, "no image bytes in row")


def _webdataset_rows(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key (the name up to the first dot of the basename) form one sample, as in
    WebDataset's own reader."""
    key, parts = None, {}
    with fs.open_input_stream(shard.paths[0]) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:  # streaming mode: one pass, no seeks (cheap on object storage)
            if not member.isfile():
                continue
            folder, base = posixpath.split(member.name)
            stem, _, ext = base.partition(".")
            if posixpath.join(folder, stem) != key and key is not None:
                yield _sample(key, parts, config)
                parts = {}
            key = posixpath.join(folder, stem)
            parts[ext.lower()] = tar.extractfile(member).read()
    if key is not None:
        yield _sample(key, parts, config)


def _sample(key: str, parts: dict[str, bytes], config: JobConfig) -> dict[str, Any]:
    image = next((parts[e] for e in (x.lstrip(".") for x in IMAGE_EXTENSIONS) if e in parts), None)
    return _row(key, image, _json_field(parts.get("json"), config.question_column),
                f"no image in sample (members: {', '.join(sorted(parts))})")


def _json_field(raw: bytes | None, name: str) -> str | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw).get(name)
    except (ValueError, AttributeError):  # not JSON, or JSON that is not an object: the sample has no question
        return None
    return None if value is None else str(value)


def _image_rows(fs: pafs.FileSystem, shard: Shard, config: JobConfig) -> Iterator[dict[str, Any]]:
    for path in shard.paths:
        with fs.open_input_stream(path) as f:
            yield _row(posixpath.relpath(path, shard.root), f.read(), None, "empty file")
