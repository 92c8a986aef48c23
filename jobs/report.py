"""trimlens nightly report: `python jobs/report.py OUTPUT [--html report.html]`; see README "Nightly runs"."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pipeline.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
