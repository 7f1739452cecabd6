"""One accuracy-FLOPs Pareto figure from the rows of several `vitbudget bench` runs on the same images.

Runs of different suites on one model and one image subset belong on one figure (a new method's
curve next to ToMe's); `--drop` leaves rows out by label (a regular expression), e.g. settings far
off the range of interest that would squash the axis (say so in the caption):

    python scripts/pareto_from_bench.py runs/real_newer runs/real_perimage --drop "thr0 0\\.(9|85)" \\
        --title "..." --out docs/figures/real/newer_methods_pareto.png
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from vitbudget.report.pareto import save_pareto


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="output folders of `vitbudget bench` (their bench.json)")
    parser.add_argument("--split", default="test", help="the split whose rows to draw (default test)")
    parser.add_argument("--drop", action="append", default=[], help="leave out rows whose label matches this regular expression")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    rows, images = {}, set()
    for run in args.runs:
        split = json.loads((run / "bench.json").read_text())["splits"][args.split]
        images.add(split["images"])
        for label, row in split["rows"].items():
            if not any(re.search(pattern, label) for pattern in args.drop):
                rows.setdefault(label, row)  # a label in two runs (the baseline): the first run's
    if len(images) > 1:
        print(f"note: the runs measured different numbers of images ({sorted(images)}): points are not on the same images")
    save_pareto(rows, args.out, title=args.title, speed_key=None)
    print(f"wrote {args.out} ({len(rows)} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
