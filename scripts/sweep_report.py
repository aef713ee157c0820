"""Gather a sweep's results.json files into one CSV, a markdown table and plots.

    python scripts/sweep_report.py SWEEP_DIR
    python scripts/sweep_report.py SWEEP_DIR --paired protect --baseline class

Writes sweep.csv, sweep.md (settings shared by every run in one line above the table) and
sweep.png (each swept setting other than r, such as protect, gets its own line). With --paired KEY,
runs that differ only in KEY are compared sample by sample (their predictions.csv): each other value
of KEY against the baseline value (three or more values work), delta_top1, a 95% paired bootstrap
interval and an exact McNemar p-value, in paired_KEY_vs_BASELINE.csv/.md/.png beside the plain
report (run it again with another --baseline for the other pairs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # engine/, data/: beside scripts/, not installed
from engine.report.sweep import ReportError, collect, write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep dir)")
    parser.add_argument("--paired", default=None, help="compare runs that differ only in this key (e.g. protect)")
    parser.add_argument("--baseline", default=None, help="the baseline value of --paired (default: the first seen)")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder; pass the multirun folder of a sweep", file=sys.stderr)
        sys.exit(2)
    try:
        rows = collect(args.sweep_dir)
        paths = write_report(rows, args.out or args.sweep_dir, paired=args.paired, baseline=args.baseline)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(paths.get("paired_md", paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
