"""The nightly report of an output: its runs as a table and, for --html, one self-contained page (a plot of cost
and throughput per run, the latest run's error rows grouped by reason, a sample of images beside their captions;
every image embedded as base64, so the page can be mailed or archived as one file)."""
from __future__ import annotations

import argparse
import base64
import html
import io
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import history
from pipeline.config import ConfigError, JobConfig
from pipeline.sinks import shard_folder
from pipeline.sources import list_shards, open_uri, read_shard

SAMPLE_IMAGES = 6
THUMBNAIL_PX = 160
RETRY_SECONDS = 30.0
COLUMNS = ("run", "start (UTC)", "new", "changed", "unchanged", "retried", "failed", "not started", "rows", "errors",
           "cost USD", "images/s", "device-s")


def run_row(run: dict[str, Any]) -> list[str]:
    """One run as the table's cells, in COLUMNS order."""
    shards = run["shards"]
    return [run["run_id"], run["start"][:19].replace("T", " "), *(str(shards[k]) for k in
            ("new", "changed", "unchanged", "retried", "failed", "not_started")), str(run["rows"]), str(run["errors"]),
            f"{run['cost_usd']:.4g}", f"{run['images_per_s']:.2f}", f"{run['device_seconds']:.1f}"]


def text_table(runs: list[dict[str, Any]]) -> str:
    rows = [list(COLUMNS), *(run_row(r) for r in runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    def line(row: list[str]) -> str:  # run id and start to the left, figures to the right
        return "  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    return "\n".join(line(row) for row in rows)


def trend_plot(runs: list[dict[str, Any]]) -> str:
    """PNG (base64) of cost and images/s per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["start"][5:16].replace("T", " ") for r in runs]
    fig, (cost, speed) = plt.subplots(1, 2, figsize=(9, 2.8), dpi=100)
    cost.bar(labels, [r["cost_usd"] for r in runs], color="#4c78a8")
    cost.set_title("cost per run (USD)", fontsize=10)
    cost.ticklabel_format(axis="y", style="sci", scilimits=(-2, 4))  # cents and below read as 1.6e-4, not 0.000160
    speed.plot(labels, [r["images_per_s"] for r in runs], marker="o", color="#f58518")
    speed.set_title("throughput (images/s)", fontsize=10)
    speed.set_ylim(bottom=0)
    for axis in (cost, speed):
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
        axis.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def latest_results(fs: pafs.FileSystem, root: str, run: dict[str, Any]) -> pa.Table:
    """The result rows of the shards the run wrote (a --retry-errors shard: the whole shard as it is now)."""
    tables = [pq.read_table(f"{root}/results/{shard_folder(s)}/part-0.parquet", filesystem=fs)
              for s in run["written_shards"]]
    return pa.concat_tables(tables) if tables else None


def errors_by_reason(results: pa.Table | None) -> list[tuple[str, int, list[str]]]:
    """(reason, rows, up to three example ids), most frequent first."""
    if results is None:
        return []
    failed = results.filter(results.column("error").is_valid())
    reasons = Counter(failed.column("error").to_pylist())
    examples: dict[str, list[str]] = {}
    for key, reason in zip(failed.column("id").to_pylist(), failed.column("error").to_pylist()):
        examples.setdefault(reason, [])
        if len(examples[reason]) < 3:
            examples[reason].append(key)
    return [(reason, n, examples[reason]) for reason, n in reasons.most_common()]


def thumbnails(settings: dict[str, Any], picks: list[dict[str, Any]]) -> dict[str, str]:
    """id -> base64 JPEG thumbnail of the picked rows, read back from the run's input."""
    from PIL import Image

    config = JobConfig(**{**settings, "actors": tuple(settings["actors"])})
    fs, root = open_uri(config.input, "--input")
    wanted: dict[str, set[str]] = {}
    for row in picks:
        wanted.setdefault(row["shard"], set()).add(row["id"])
    out = {}
    for shard in list_shards(fs, root, config):
        if shard.name in wanted:
            for table in read_shard(fs, replace(shard, only_ids=frozenset(wanted[shard.name])), config):
                for key, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
                    if not data:
                        continue
                    image = Image.open(io.BytesIO(data)).convert("RGB")
                    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                    buffer = io.BytesIO()
                    image.save(buffer, "JPEG", quality=85)
                    out[key] = base64.b64encode(buffer.getvalue()).decode()
    return out


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f4f4f4}td.l,th.l{text-align:left}.grid{display:flex;flex-wrap:wrap;gap:14px}
.card{width:180px;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:13px}
.card img{display:block;margin:0 auto 6px;height:120px;max-width:160px;object-fit:contain;image-rendering:pixelated}
.muted{color:#777}"""


def html_page(output: str, runs: list[dict[str, Any]], results: pa.Table | None, thumbs: dict[str, str]) -> str:
    latest = runs[-1]
    esc = html.escape
    head = "".join(f'<th class="{"l" if i < 2 else ""}">{esc(c)}</th>' for i, c in enumerate(COLUMNS))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < 2 else ""}">{esc(c)}</td>'
                                    for i, c in enumerate(run_row(r))) + "</tr>" for r in runs)
    grouped = errors_by_reason(results)
    errors = ("".join(f'<tr><td class="l">{esc(reason)}</td><td>{n}</td><td class="l">{esc(", ".join(ids))}</td></tr>'
                      for reason, n, ids in grouped) if grouped else '<tr><td class="l" colspan="3">none</td></tr>')
    failed = "".join(f"<li>{esc(shard)}: {esc(reason)}</li>" for shard, reason in latest["failed_shards"].items())
    cards = "".join(f'<div class="card"><img alt="{esc(key)}" src="data:image/jpeg;base64,{thumbs[key]}">'
                    f'<b>{esc(key)}</b><br>{esc(text or "")}</div>'
                    for key, text in sample_captions(results) if key in thumbs)
    fingerprint = latest["fingerprint"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>trimlens nightly: {esc(output)}</title>
<style>{STYLE}</style></head><body>
<h1>trimlens nightly report</h1>
<p>{esc(output)} &middot; {len(runs)} runs &middot; latest {esc(latest['run_id'])}: {latest['rows']} rows,
{latest['errors']} errors, ${latest['cost_usd']:.4g}; the output holds {latest['output_rows']} rows
({latest['output_errors']} errors)<br><span class="muted">{esc(fingerprint['model'])} &middot;
{esc(fingerprint['reduction'])} &middot; {esc(fingerprint['dtype'])} &middot; trimlens {esc(fingerprint['version'])}
</span></p>
<h2>Runs</h2><table><tr>{head}</tr>{body}</table>
<h2>Cost and throughput</h2><img alt="cost and throughput per run" src="data:image/png;base64,{trend_plot(runs)}">
<h2>Latest run: error rows by reason</h2>
<table><tr><th class="l">reason</th><th>rows</th><th class="l">examples</th></tr>{errors}</table>
{f'<p>Shards that could not be read (the next run retries them):</p><ul>{failed}</ul>' if failed else ''}
<h2>Latest run: sample captions</h2><div class="grid">{cards or '<p class="muted">no captioned rows</p>'}</div>
</body></html>
"""


def sample_captions(results: pa.Table | None) -> list[tuple[str, str]]:
    """(id, text) of up to SAMPLE_IMAGES captioned rows, spread over the table."""
    if results is None:
        return []
    ok = results.filter(pc.invert(results.column("error").is_valid()))
    step = max(1, len(ok) // SAMPLE_IMAGES)
    picked = ok.take(list(range(0, len(ok), step))[:SAMPLE_IMAGES])
    return list(zip(picked.column("id").to_pylist(), picked.column("text").to_pylist()))


def build(output: str, html_path: str | None) -> str:
    """The table (printed) and, with `html_path`, the page written there."""
    fs, root = open_uri(output, "OUTPUT")
    runs = history.read_runs(fs, root, RETRY_SECONDS)
    if not runs:
        raise ConfigError(f"no runs recorded under {output}/runs/ (a job writes one there each time it runs)")
    text = text_table(runs)
    if html_path:
        results = latest_results(fs, root, runs[-1])
        rows = results.to_pylist() if results is not None else []
        picked_ids = {key for key, _ in sample_captions(results)}
        thumbs = thumbnails(runs[-1]["settings"], [r for r in rows if r["id"] in picked_ids])
        Path(html_path).write_text(html_page(output, runs, results, thumbs))
        text += f"\nreport page: {html_path}"
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of jobs/report.py."""
    from pipeline.job import entry_point

    parser = argparse.ArgumentParser(prog="report.py", description="The run history of a trimlens output: one line "
                                     "per run (shards new / changed / unchanged / retried / failed / not started, "
                                     "rows, errors, cost, throughput). Exit status 2: no runs recorded there.")
    parser.add_argument("output", metavar="OUTPUT", help="the --output of the jobs (a URI or local path)")
    parser.add_argument("--html", metavar="report.html", help="also write a self-contained page: cost and throughput "
                        "over the runs, the latest run's error rows by reason, sample images beside their captions "
                        "(default: none)")
    args = parser.parse_args(argv)
    return entry_point("report.py", lambda: build(args.output, args.html), "run the same command again")
