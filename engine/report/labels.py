"""How a sweep's runs are told apart: the settings that vary, and short labels for runs and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SWEPT = ("protect", "prop_attn", "model", "dataset", "checkpoint", "registers")


def swept_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Settings other than r whose value differs between runs."""
    return [k for k in SWEPT if len({json.dumps(row.get(k)) for row in rows}) > 1]


def short_label(key: str, value: Any) -> str:
    if key == "checkpoint" and value and value != "pooled":
        path = Path(str(value))
        # RUN/checkpoints/last.pt is named by its run folder; any other file by its own name
        return path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
    return str(value)


def group_label(row: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={short_label(k, row.get(k))}" for k in keys) or "all runs"
