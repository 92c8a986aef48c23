"""trimlens planner. `python jobs/plan.py --help` lists every setting; see README "Choosing a method and a ratio"."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray job working dir

from pipeline.planner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
