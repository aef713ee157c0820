"""Reports of what was run and measured: sweep reports and paired statistics (`sweep`, `stats`), the benchmark's
files (`benchmark_report`), visualize's pictures (`figures`), register fates; here, what every figure shares (no
torch: the sweep report imports it). Figures are matplotlib `Figure`s drawn off-screen, outside pyplot (no window,
nothing to close). The measurements themselves are `engine.measure`."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

from matplotlib.figure import Figure

from ..run.folder_claim import atomic_write


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """`fig` saved whole or not at all (a stop mid-write keeps no half of a PNG), in the format its suffix names."""
    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png"))


def fit_title(text: str, width_inches: float, fontsize: float = 7) -> str:
    """Wrap each line of `text` to fit a figure `width_inches` wide (matplotlib clips a suptitle at the figure's
    edges). An average character is about 0.55 of the font size wide."""
    per_line = max(20, int(width_inches * 72 / (0.55 * fontsize)) - 2)
    return "\n".join(part for line in text.split("\n") for part in textwrap.wrap(line, per_line) or [""])
