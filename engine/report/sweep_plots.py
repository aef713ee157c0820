"""The sweep report's figures: top-1 against images/s per swept setting, and paired deltas against GFLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .labels import group_label, short_label, swept_keys
from .pyplot import pyplot, save_figure


def _title(rows: list[dict[str, Any]]) -> str:
    first = rows[0]
    return (
        f"{first.get('model', '')} on {first.get('dataset', '')}\n({first.get('device', '')}, "
        f"batch {first.get('batch_size', '')}, {first.get('dtype', '')})"
    )


def _point_label(row: dict[str, Any], with_r: bool = True) -> str:
    """'r=4', or for a run whose r a FLOP budget chose, 'flops=0.33' and with_r ' (r=[12,-1.0])'."""
    schedule = str(row.get("schedule") or f"r={row['r']}")
    return schedule if schedule.startswith("r=") or not with_r else f"{schedule} (r={row['r']})"


def _merging_order(row: dict[str, Any]) -> tuple:
    """Less merging first: more GFLOPs (what r takes away, counted, not timed), then the smaller r asked."""
    r = str(row["r"])
    return (-(row.get("gflops") or 0.0), (0, int(r), "") if r.isdigit() else (1, 0, r))


def sweep_lines(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The runs of each line of sweep.png (one per combination of swept settings besides r), in order of r:
    a line walks from the least merging to the most, whatever order the measured images/s put them in."""
    keys = swept_keys(rows)
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["top1"] is not None and row["images_per_s"] is not None:
            lines.setdefault(group_label(row, keys), []).append(row)
    return {label: sorted(members, key=_merging_order) for label, members in lines.items()}


def plot_sweep(rows: list[dict[str, Any]], path: Path) -> None:
    """Top-1 against images/s: one line per combination of swept settings, joining its runs in order of r,
    r written at each point."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for g, (label, members) in enumerate(sweep_lines(rows).items()):
        (line,) = ax.plot([m["images_per_s"] for m in members], [m["top1"] for m in members], "o-", label=label)
        for m in members:  # one side per line: labels of different lines do not sit on each other
            ax.annotate(
                _point_label(m),
                (m["images_per_s"], m["top1"]),
                textcoords="offset points",
                xytext=(5, 6 if g % 2 == 0 else -12),
                fontsize=7,
                color=line.get_color(),
            )
    ax.set_xlabel("images / s")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(_title(rows), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def plot_paired(rows: list[dict[str, Any]], key: str, path: Path, baseline: str) -> None:
    """Delta top-1 with its 95% interval against GFLOPs, one series per compared value and checkpoint."""
    plt = pyplot()
    compared = [r for r in rows if r.get("delta_top1") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    series: dict[str, list[dict[str, Any]]] = {}
    for row in compared:
        label = f"{key}={row.get(key)}, {short_label('checkpoint', row.get('checkpoint'))}"
        series.setdefault(label, []).append(row)
    labelled: set[str] = set()
    for i, (label, members) in enumerate(series.items()):
        members = sorted(members, key=lambda r: -r["gflops"])
        x = [m["gflops"] * (1 + 0.004 * (i - len(series) / 2)) for m in members]  # small dodge
        y = [m["delta_top1"] for m in members]
        err = [[m["delta_top1"] - m["ci_low"] for m in members], [m["ci_high"] - m["delta_top1"] for m in members]]
        pooled = "pooled" in label
        ax.errorbar(
            x,
            y,
            yerr=err,
            fmt="o-" if pooled else "o:",
            capsize=3,
            lw=2 if pooled else 1,
            ms=5 if pooled else 3,
            label=label,
        )
        for m, xi, yi, high in zip(members, x, y, err[1]):  # each schedule named once, above its interval
            name = _point_label(m, with_r=False)  # at one budget each mode may run another r
            if name not in labelled:
                labelled.add(name)
                ax.annotate(name, (xi, yi + high), textcoords="offset points", xytext=(0, 4), fontsize=6, ha="center")
    ax.axhline(0, color="grey", lw=0.8)
    ax.invert_xaxis()  # more merging to the right
    ax.set_xlabel("GFLOPs per image (more merging to the right)")
    ax.set_ylabel(f"delta top-1 vs {key}={baseline} (points, 95% CI)")
    ax.set_title(_title(compared or rows), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
