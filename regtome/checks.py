"""Checks of the patch options: every value is validated before a forward pass uses it."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .layout import PrefixLayout
from .protection import protection
from .schedule import parse_r

OPTIONS = ("r", "prop_attn", "trace_source", "protect", "class_layer", "register_layer")


def check_options(options: dict[str, Any], layout: PrefixLayout, depth: int) -> list[int]:
    """Validate the patch options (they may change between calls); return the per-block r.

    Raises ValueError naming the option and what it must be.
    """
    r_per_block = parse_r(depth, options["r"])
    protection(options["protect"])
    for name in ("prop_attn", "trace_source"):
        if not isinstance(options[name], bool):
            raise ValueError(f"{name} must be True or False, got {options[name]!r}")
    for name, count, what in (
        ("class_layer", layout.num_class, "a class token"),
        ("register_layer", layout.num_register, "register tokens"),
    ):
        layer = options[name]
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < depth:
            raise ValueError(f"{name} must be an int in [0, {depth - 1}], got {layer!r}")
        if layer > 0 and count == 0:
            raise ValueError(f"{name}={layer} but the model has no {what}; set {name}=0")
    return r_per_block


def model_options(model: nn.Module) -> dict[str, Any]:
    """The patch options as they are set on `model` now."""
    return {name: getattr(model, name) for name in OPTIONS}
