"""Reports of what was run and measured: sweep reports and their paired statistics (`sweep`), register fates;
here, what every figure and table shares (no torch: the sweep report imports it). Figures are matplotlib `Figure`s
drawn off-screen, outside pyplot (no window, nothing to close)."""

from __future__ import annotations

import csv
import os
import textwrap
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterable

from ..run.folder_claim import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """`fig` saved whole or not at all (a stop mid-write keeps no half of a PNG), in the format its suffix names."""
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png"))


def fit_title(text: str, width_inches: float, fontsize: float = 7) -> str:
    """Wrap each line of `text` to fit a figure `width_inches` wide (matplotlib clips a suptitle at the figure's
    edges). An average character is about 0.55 of the font size wide."""
    per_line = max(20, int(width_inches * 72 / (0.55 * fontsize)) - 2)
    return "\n".join(part for line in text.split("\n") for part in textwrap.wrap(line, per_line) or [""])


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: list[str]) -> None:
    """`rows` under `columns` (other keys left out), written whole or not at all."""

    def write(f: IO[str]) -> None:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write, text=True)


def write_lines(path: Path, lines: list[str]) -> None:
    """A text file of `lines`, written whole or not at all."""
    atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), text=True)
