"""Gather a sweep's results.json files into one CSV, a markdown table and an accuracy-vs-speed plot.

    python scripts/sweep_report.py multirun/eval/cifar10_vit_small_patch16_224/2026-11-24_10-00-00_1234
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

COLUMNS = ["run", "task", "dataset", "model", "registers", "r", "protect", "top1", "top5", "images_per_s",
           "gflops", "batch_size", "dtype", "device"]


def _natural(path: Path) -> list:
    """Job folders 0, 1, ..., 10 in numeric order."""
    return [int(part) if part.isdigit() else part for part in path.parts]


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(sweep_dir.rglob("results.json"), key=_natural):
        record = json.loads(path.read_text())
        rows.append({"run": str(path.parent.relative_to(sweep_dir))} | {k: record.get(k) for k in COLUMNS[1:]})
    return rows


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "sweep.csv", "md": out_dir / "sweep.md", "png": out_dir / "sweep.png"}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
    paths["md"].write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    points = sorted((row["images_per_s"], row["top1"], str(row["r"])) for row in rows if row["top1"] is not None)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
    for speed, top1, r in points:
        ax.annotate(f"r={r}", (speed, top1), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("images / s")
    ax.set_ylabel("top-1 accuracy (%)")
    first = rows[0] if rows else {}
    ax.set_title(f"{first.get('model', '')} on {first.get('dataset', '')} ({first.get('device', '')}, "
                 f"batch {first.get('batch_size', '')}, {first.get('dtype', '')})", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths["png"])
    plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep dir)")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        sys.exit(f"error: {args.sweep_dir} is not a folder; pass the multirun folder of a sweep")
    rows = collect(args.sweep_dir)
    if not rows:
        sys.exit(f"error: no results.json under {args.sweep_dir}; did the sweep's runs finish?")
    paths = write_report(rows, args.out or args.sweep_dir)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
