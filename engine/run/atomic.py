"""Files written whole or not at all: the one way the CLI writes what a run keeps (checkpoints, results.json,
predictions.csv)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], text: bool = False) -> Path:
    """Call `write(file)` on a temp file in the same folder, fsync, then rename it over `path`.

    A process killed at any moment, or a disk that fills up, leaves either the old file or the new one,
    never half of one (and no temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w" if text else "wb", **({"newline": ""} if text else {})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path
