"""matplotlib set up once for every figure the CLI draws (no torch here: the sweep report imports it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """`fig` saved whole or not at all (a stop mid-write keeps no half of a PNG), in the format its suffix names."""
    from ..run.folder_claim import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png"))
