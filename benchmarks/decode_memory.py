"""Peak memory of the decode stage on decompression bombs, with and without the --max-image-pixels bound.

Each measurement runs in a fresh process (peak RSS only ever grows): it loads the bundled model's processor, then
puts one file of the bomb set through what the decode stage does per row (bytes -> RGB -> processor tensors,
`pipeline.decode._prepare_row`) and reports the peak RSS above what the process held just before.
"Before" is what a worker did with PIL's own limit only (178,956,970 pixels, PIL's DecompressionBombError
threshold); "after" is the default bound.

    .venv/bin/python benchmarks/decode_memory.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import JobConfig  # noqa: E402

PIL_LIMIT = 2 * 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: above 2x it PIL itself refuses to open the file
BOMBS = {"png-12000x12000": ("PNG", 12000, 12000), "png-9000x9000": ("PNG", 9000, 9000),
         "jpeg-10000x8000": ("JPEG", 10000, 8000)}


def bomb_set(folder: Path) -> dict[str, int]:
    """Small files that decode to 81-144 M pixels; name -> bytes on disk."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, (fmt, width, height) in BOMBS.items():
        path = folder / f"{name}.{fmt.lower()}"
        if not path.exists():
            Image.new("1" if fmt == "PNG" else "L", (width, height), 1).save(path, fmt)
        sizes[name] = path.stat().st_size
    return sizes


def measure_one(path: Path, max_pixels: int) -> None:
    """(In the child process.) Prepare one file as a row; print JSON: the outcome and the peak RSS growth in MB."""
    from pipeline.decode import _prepare_row, error_text, load_processor

    config = JobConfig()
    processor = load_processor(config.model)
    data = path.read_bytes()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        outcome = f"prepared ({len(_prepare_row(processor, data, config.prompt, max_pixels))} bytes of tensors)"
    except Exception as e:  # noqa: BLE001 -- an error row is the expected outcome for a bomb
        outcome = error_text(e)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_growth_mb": round((peak - base) / 1024, 1), "outcome": outcome}))


def measure(path: Path, max_pixels: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), str(max_pixels)], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="/tmp/trimlens-bombs", help="where the bomb set is written")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure_one(Path(args.child[0]), int(args.child[1]))
        return
    folder = Path(args.folder)
    sizes = bomb_set(folder)
    limit = JobConfig().max_image_pixels
    settings = {"before (PIL's limit only)": PIL_LIMIT, f"after (--max-image-pixels {limit})": limit}
    results = {name: {"bytes": sizes[name],
                      **{label: measure(next(folder.glob(f"{name}.*")), pixels) for label, pixels in settings.items()}}
               for name in BOMBS}
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
