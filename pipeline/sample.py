"""The planner's sample: count the dataset's rows and draw N of them uniformly at random with a seed, reading
only what is needed (Parquet footers and the row groups holding a drawn row, a folder listing and the drawn image
files, tar headers and the drawn members), then write them as one local Parquet file that the job pipeline reads.

Counting: Parquet row counts come from the footers and image folders from the listing, so both are exact. A tar's
sample count is known only from its headers (a seek per member, no image data read): up to TARS_COUNTED tars are
all counted; beyond that a seeded random subset of TARS_COUNTED is, the total is estimated as (tars x mean count)
with a 95 % interval from the subset's spread, and rows are drawn from the counted tars (shards of a WebDataset
are random splits of one collection, so any subset of them is a fair sample of it).
"""
from __future__ import annotations

import math
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import retry
from pipeline.config import ConfigError, JobConfig
from pipeline.sources import Shard, _json_field, _sample

TARS_COUNTED = 32
SAMPLE_SCHEMA = pa.schema([
    ("id", pa.string()),             # position in the sample: the key the planner joins configurations on
    ("source_shard", pa.string()), ("source_id", pa.string()),
    ("image", pa.binary()), ("question", pa.string()), ("reference", pa.string()),
])


@dataclass
class RowCount:
    """How many rows the dataset holds; `rows` per shard is None for a tar that was not counted."""
    rows: list[int | None]
    total: float                      # exact, or estimated when some tars were not counted
    interval: tuple[float, float]     # 95 % interval of `total` (equal to it when exact)

    @property
    def exact(self) -> bool:
        return all(n is not None for n in self.rows)


def _split_member(name: str) -> tuple[str, str]:
    """A tar member's name -> (sample key, extension), as WebDataset splits it: at the first dot of the basename."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem), ext.lower()


def _tar_samples(fs: pafs.FileSystem, path: str) -> list[list[tarfile.TarInfo]]:
    """The tar's samples (consecutive members sharing a key, as sources._webdataset_rows groups them), from the
    headers alone: tarfile seeks over the member data."""
    samples: list[list[tarfile.TarInfo]] = []
    key = None
    with fs.open_input_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            member_key = _split_member(member.name)[0]
            if member_key != key:
                samples.append([])
                key = member_key
            samples[-1].append(member)
    return samples


def _count(fs: pafs.FileSystem, shard: Shard) -> int:
    if shard.format == "parquet":
        return pq.read_metadata(shard.paths[0], filesystem=fs).num_rows
    if shard.format == "images":
        return len(shard.paths)
    return len(_tar_samples(fs, shard.paths[0]))


def count_rows(fs: pafs.FileSystem, shards: list[Shard], seed: int, retry_seconds: float) -> RowCount:
    """Rows per shard and in all (see the module docstring for tars). Raises ConfigError for an unreadable shard;
    waits out an object-store outage of up to `retry_seconds` (pipeline/retry.py)."""
    rows: list[int | None] = [None] * len(shards)
    tars = [i for i, s in enumerate(shards) if s.format == "webdataset"]
    counted_tars = set(tars) if len(tars) <= TARS_COUNTED else set(
        np.random.default_rng(seed).choice(tars, TARS_COUNTED, replace=False).tolist())
    for i, shard in enumerate(shards):
        if shard.format == "webdataset" and i not in counted_tars:
            continue
        try:
            rows[i] = retry.call(lambda: _count(fs, shard), f"counting the rows of {shard.name}", retry_seconds)
        except (OSError, pa.ArrowException, tarfile.TarError) as e:
            raise ConfigError(f"cannot read shard {shard.name}: {str(e).splitlines()[0]}") from None
    known = [n for n in rows if n is not None]
    if len(known) == len(rows):
        return RowCount(rows, float(sum(known)), (float(sum(known)), float(sum(known))))
    tar_counts = np.array([rows[i] for i in sorted(counted_tars)], dtype=np.float64)
    uncounted = len(rows) - len(known)
    estimate = sum(known) + uncounted * tar_counts.mean()
    # Standard error of (uncounted x mean), with the finite-population correction for drawing tars without replacement.
    spread = uncounted * tar_counts.std(ddof=1) / math.sqrt(len(tar_counts)) * math.sqrt(1 - len(tar_counts) / len(tars))
    return RowCount(rows, float(estimate), (float(estimate - 1.96 * spread), float(estimate + 1.96 * spread)))


def draw(count: RowCount, n: int, seed: int) -> list[tuple[int, int]]:
    """`n` distinct (shard index, row within the shard) pairs, uniform over the counted rows, in read order."""
    sizes = np.array([r or 0 for r in count.rows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])                             # [shards + 1]
    picks = np.sort(np.random.default_rng(seed).choice(int(starts[-1]), size=min(n, int(starts[-1])), replace=False))
    shard_of = np.searchsorted(starts, picks, side="right") - 1
    return [(int(s), int(p - starts[s])) for s, p in zip(shard_of, picks)]


def _parquet_rows(fs: pafs.FileSystem, shard: Shard, wanted: list[int], config: JobConfig,
                  reference_column: str | None) -> list[dict[str, Any]]:
    """The wanted rows, reading only the row groups that hold them."""
    out = []
    with fs.open_input_file(shard.paths[0]) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        if reference_column and reference_column not in names:
            raise ConfigError(f"Parquet input {shard.name} has no column {reference_column!r} "
                              f"(--reference-column; columns: {', '.join(names)})")
        columns = [c for c in (config.id_column, config.image_column, config.question_column, reference_column)
                   if c and c in names]
        group_starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows
                                        for g in range(parquet.num_row_groups)])
        by_group: dict[int, list[int]] = {}
        for row in wanted:
            by_group.setdefault(int(np.searchsorted(group_starts, row, side="right") - 1), []).append(row)
        for group, rows in by_group.items():
            table = parquet.read_row_group(group, columns=columns).take([r - group_starts[group] for r in rows])
            images = table.column(config.image_column)
            if pa.types.is_struct(images.type):  # Hugging Face datasets layout: {bytes, path}
                images = pa.chunked_array([c.field("bytes") for c in images.chunks])

            def column(name: str | None) -> list[Any]:
                return (table.column(name).cast(pa.string()).to_pylist() if name and name in columns
                        else [None] * table.num_rows)

            for key, image, question, reference in zip(column(config.id_column), images.to_pylist(),
                                                       column(config.question_column), column(reference_column)):
                out.append({"source_id": key, "image": image, "question": question, "reference": reference})
    return out


def _tar_rows(fs: pafs.FileSystem, shard: Shard, wanted: list[int], config: JobConfig,
              reference_column: str | None) -> list[dict[str, Any]]:
    samples = _tar_samples(fs, shard.paths[0])
    out = []
    with fs.open_input_file(shard.paths[0]) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for index in wanted:
            members = samples[index]
            parts = {_split_member(m.name)[1]: tar.extractfile(m).read() for m in members}
            row = _sample(_split_member(members[0].name)[0], parts, config)
            out.append({"source_id": row["id"], "image": row["image"], "question": row["question"],
                        "reference": _json_field(parts.get("json"), reference_column) if reference_column else None})
    return out


def _image_rows(fs: pafs.FileSystem, shard: Shard, wanted: list[int], config: JobConfig,
                reference_column: str | None) -> list[dict[str, Any]]:
    if reference_column:
        raise ConfigError("--reference-column needs Parquet or WebDataset input (an image folder has no columns)")
    out = []
    for index in wanted:
        with fs.open_input_stream(shard.paths[index]) as f:
            out.append({"source_id": posixpath.relpath(shard.paths[index], shard.root), "image": f.read(),
                        "question": None, "reference": None})
    return out


def read_sample(fs: pafs.FileSystem, shards: list[Shard], picks: list[tuple[int, int]], config: JobConfig,
                reference_column: str | None) -> pa.Table:
    """The picked rows (SAMPLE_SCHEMA), in the order of `picks`. Raises ConfigError for an unreadable shard."""
    readers = {"parquet": _parquet_rows, "webdataset": _tar_rows, "images": _image_rows}
    rows: list[dict[str, Any]] = []
    for s in sorted({s for s, _ in picks}):
        shard = shards[s]
        wanted = [r for t, r in picks if t == s]
        try:
            found = retry.call(lambda: readers[shard.format](fs, shard, wanted, config, reference_column),
                               f"reading the sample from {shard.name}", config.io_retry_seconds)
        except (OSError, pa.ArrowException, tarfile.TarError) as e:
            raise ConfigError(f"cannot read shard {shard.name}: {str(e).splitlines()[0]}") from None
        rows.extend({**row, "source_shard": shard.name} for row in found)
    return pa.Table.from_pylist([{**row, "id": f"{i:06d}"} for i, row in enumerate(rows)], schema=SAMPLE_SCHEMA)
