"""task=benchmark's files: benchmark.csv (every row), benchmark.md (the table and notes) and benchmark.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from matplotlib.figure import Figure

from . import fit_title, save_figure, write_csv, write_lines

TABLE = (
    "| mode | run | r | batch | images/s | latency ms (p90) | speedup | vs eager unpatched | GFLOPs | "
    "FLOP-ideal | of ideal | warm-up s | peak MB | data-bound |"
)


def _line(row: dict[str, Any]) -> str:
    bound = {True: "yes", False: "no", None: ""}[row.get("data_bound")]
    return (
        f"| {row['mode']} | {row['execution']} | {row['r']} | {row['batch_size']} | {row['images_per_s']:.1f} | "
        f"{row['latency_ms']:.1f} ({row['latency_p90_ms']:.1f}) | {row['speedup']:.2f}x | "
        f"{row['speedup_vs_eager']:.2f}x | {row['gflops']:.3g} | {row['flop_speedup']:.2f}x | "
        f"{row['of_ideal']:.0%} | {row['warmup_s']:.1f} | {row['peak_memory_mb']:.0f} | {bound} |"
    )


def write_outputs(
    rows: list[dict[str, Any]], meta: dict[str, Any], notes: list[str], run_dir: Path, warning: Optional[str] = None
) -> None:
    """benchmark.csv, benchmark.md (the table, then `notes`) and benchmark.png; `warning` (a busy machine) is
    among the notes and in the figure too, which is often all that is looked at."""
    columns = list(dict.fromkeys([*(k for row in rows for k in row), *meta]))
    # a row's own protection mode wins over the run's
    write_csv(run_dir / "benchmark.csv", [meta | row for row in rows], columns)
    header = ", ".join(f"{k} {v}" for k, v in meta.items())
    lines = [f"# RegToMe benchmark\n\n{header}\n", TABLE, "|" + "---|" * TABLE.count(" | ") + "---|"]
    lines += [_line(row) for row in rows]
    lines += [
        "",
        "speedup: against the unpatched model run the same way (eager or compiled); vs eager unpatched: "
        "against the unpatched model run eagerly; warm-up s: the first calls, compilation included.",
        "",
    ]
    lines += [f"- {note}" for note in notes]
    write_lines(run_dir / "benchmark.md", lines)
    plot(rows, meta, run_dir / "benchmark.png", warning)


def _schedule(row: dict[str, Any]) -> str:
    """A row's r without its protection mode ('16 apart' -> '16'): the x axis when modes are compared."""
    return row["r"].removesuffix(f" {row['protect']}") if row.get("protect") else row["r"]


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path, warning: Optional[str] = None) -> None:
    """Speedup against r, one panel per mode, one line per way of running and batch size; the FLOP-ideal dashed.
    `warning` is the title's last line."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    width = 5.5 * len(modes)  # inches: one 5.5-inch panel per mode
    fig = Figure(figsize=(width, 4.4), dpi=100)
    for ax, mode in zip(fig.subplots(1, len(modes), squeeze=False)[0], modes):
        mode_rows = [r for r in rows if r["mode"] == mode]
        protects = list(dict.fromkeys(r.get("protect") for r in mode_rows if r["r"] != "unpatched")) or [None]
        for i, protect in enumerate(protects):
            named = f" ({protect})" if len(protects) > 1 else ""
            rows_of = [r for r in mode_rows if r.get("protect") == protect or r["r"] == "unpatched"]
            ideal = {_schedule(r): r["flop_speedup"] for r in rows_of}
            ax.plot(list(ideal), list(ideal.values()), "k--" if i == 0 else "k-.", label=f"FLOP-ideal{named}")
            for execution in dict.fromkeys(r["execution"] for r in rows_of):
                for batch in sorted({r["batch_size"] for r in rows_of if r["execution"] == execution}):
                    run = [r for r in rows_of if r["execution"] == execution and r["batch_size"] == batch]
                    line = {_schedule(r): r["speedup"] for r in run}
                    style = "o-" if execution == "eager" else "s:"
                    ax.plot(list(line), list(line.values()), style, label=f"{execution}, batch {batch}{named}")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(title=mode, xlabel="r schedule", ylabel="speedup over the unpatched model")
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=7)
    title = (
        f"{meta['model']} ({meta['registers']} registers, protect={meta['protect']}) on {meta['device']}, "
        f"{meta['dtype']}, compile {meta['compile']}"
    )
    if warning:
        title += f"\nWARNING: {warning}"
    fig.suptitle(fit_title(title, width, fontsize=9), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
