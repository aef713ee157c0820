"""The patch options, defined once: their names, defaults and checks. Both patch functions take their
defaults from `PatchOptions`; the `regtome.options` context manager and the record read `OPTIONS`; every
value is validated by `check_options` before a forward pass uses it."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch.nn as nn

from .layout import PrefixLayout
from .protection import DEFAULT_PROTECT, protection
from .schedule import RSchedule, parse_r


@dataclass(frozen=True)
class PatchOptions:
    """What `regtome.patch.timm` / `regtome.patch.transformers` take, with their defaults (see there)."""

    r: RSchedule = 0
    prop_attn: bool = True
    trace_source: bool = False
    protect: str = DEFAULT_PROTECT
    class_layer: int = 0
    register_layer: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in OPTIONS}


OPTIONS = tuple(field.name for field in fields(PatchOptions))
DEFAULTS = PatchOptions()


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
