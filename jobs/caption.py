"""trimlens caption job. `python jobs/caption.py --help` lists every setting; see README "Running jobs"."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working dir

from pipeline.job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("caption"))
