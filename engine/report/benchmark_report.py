"""task=benchmark's files: benchmark.csv (every row), benchmark.md (the table and notes) and benchmark.png."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any


def write_outputs(rows: list[dict[str, Any]], meta: dict[str, Any], notes: list[str], run_dir: Path) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row)) + list(meta)
    with open(run_dir / "benchmark.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(row | meta for row in rows)

    header = ", ".join(f"{k} {v}" for k, v in meta.items())
    lines = [
        f"# RegToMe benchmark\n\n{header}\n",
        "| mode | r | batch | images/s | speedup | GFLOPs | FLOP-ideal | of ideal | peak MB | data-bound |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bound = {True: "yes", False: "no", None: ""}
    lines += [
        f"| {r['mode']} | {r['r']} | {r['batch_size']} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x | "
        f"{r['gflops']:.3g} | {r['flop_speedup']:.2f}x | {r['of_ideal']:.0%} | {r['peak_memory_mb']:.0f} | "
        f"{bound[r.get('data_bound')]} |"
        for r in rows
    ]
    lines += ["", *[f"- {note}" for note in notes]]
    (run_dir / "benchmark.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows}, reverse=False)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), dpi=100, squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mode_rows = [r for r in rows if r["mode"] == mode]
        labels = list(dict.fromkeys(r["r"] for r in mode_rows))
        ideal = [next(r["flop_speedup"] for r in mode_rows if r["r"] == label) for label in labels]
        ax.plot(labels, ideal, "k--", label="FLOP-ideal")
        for batch in sorted({r["batch_size"] for r in mode_rows}):
            ax.plot(
                labels,
                [
                    next(r["speedup"] for r in mode_rows if r["r"] == label and r["batch_size"] == batch)
                    for label in labels
                ],
                "o-",
                label=f"batch {batch}",
            )
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(title=f"{mode}", xlabel="r schedule", ylabel="speedup over the unpatched model")
        ax.legend(fontsize=8)
    fig.suptitle(f"{meta['model']} ({meta['registers']} registers) on {meta['device']}, {meta['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "benchmark.png")
    plt.close(fig)
