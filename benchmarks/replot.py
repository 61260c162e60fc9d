"""Redraw the speedup plots of a recorded result file (e.g. one whose run hit its time limit before plotting).

    python benchmarks/replot.py benchmarks/results/<date>_<device>_<commit>.json
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.plots import plot_speedups  # noqa: E402


def main(argv=None) -> int:
    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        doc = json.loads(path.read_text())
        for png in plot_speedups(doc["results"], path.with_suffix("")):
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
