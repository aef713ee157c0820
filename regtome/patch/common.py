"""What every patched model shares: the patched-class registry, `options`, `last_forward`, `trace`, `remove_patch`.

A patch swaps a model's class for a subclass (`patched_class`) that remembers the original as
`_regtome_base`; the options are plain attributes (``model.r = 16``). A patched model offers
`regtome_features(x, keep)` (the merged features and the record of that pass) and
`regtome_num_blocks`; everything here works through those two.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from ..checks import OPTIONS, check_options, model_options
from ..layout import prefix_layout
from ..record import ForwardRecord
from ..schedule import RSchedule

_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


class PatchedModel:
    """What every patched model class has: the options as plain attributes, the record of its last
    pass, and its blocks (timm's `blocks`; a transformers model's encoder layers)."""

    r: RSchedule
    prop_attn: bool
    trace_source: bool
    protect: str
    class_layer: int
    register_layer: int
    regtome_record: Optional[ForwardRecord]

    @property
    def regtome_num_blocks(self) -> int:
        return len(self.blocks)


def patched_class(mixin: type, cls: type) -> type:
    """The class `RegToMe<cls>`: `mixin` in front of `cls`, made once per pair."""
    key = (mixin, cls)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"RegToMe{cls.__name__}", (mixin, cls), {"_regtome_base": cls})
    return _PATCHED_CLASSES[key]


def is_patched(model: nn.Module) -> bool:
    return getattr(type(model), "_regtome_base", None) is not None


def require_patched(model: nn.Module, what: str) -> None:
    if not is_patched(model):
        raise TypeError(f"{what} needs a model patched with regtome.patch.timm or regtome.patch.transformers, "
                        f"got {type(model).__name__}")


def validate(model: nn.Module) -> list[int]:
    """The model's options checked (ValueError naming the bad one); returns r per block."""
    return check_options(model_options(model), prefix_layout(model), model.regtome_num_blocks)


def set_options(model: nn.Module, options: dict[str, Any]) -> None:
    """Set patch options on a freshly patched model; undo the patch and raise if one is invalid."""
    for name, value in options.items():
        setattr(model, name, value)
    try:
        validate(model)
    except ValueError:
        remove_patch(model)
        raise
    model.regtome_record = None


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo `regtome.patch.timm` / `regtome.patch.transformers`: restore the original classes and
    drop RegToMe's attributes. Returns the model."""
    base = getattr(type(model), "_regtome_base", None)
    if base is None:
        return model
    for inner in getattr(model, "regtome_inner_models", lambda: [])():
        remove_patch(inner)
    model.__class__ = base
    for name in OPTIONS + ("regtome_record",):
        model.__dict__.pop(name, None)
    return model


@contextmanager
def options(model: nn.Module, **changes: Any) -> Iterator[nn.Module]:
    """Apply patch options for a block of code; the previous ones come back on exit, also on error.

        with regtome.options(model, r=16, protect="class"):
            logits = model(images)

    Any of r, prop_attn, trace_source, protect, class_layer, register_layer. The new values are
    checked before the block runs (ValueError, and nothing changed, when one is invalid).
    """
    require_patched(model, "regtome.options")
    unknown = sorted(set(changes) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown RegToMe option(s) {', '.join(unknown)}; options are {', '.join(OPTIONS)}")
    previous = {name: getattr(model, name) for name in changes}
    try:
        for name, value in changes.items():
            setattr(model, name, value)
        validate(model)
    except ValueError:
        for name, value in previous.items():
            setattr(model, name, value)
        raise
    try:
        yield model
    finally:
        for name, value in previous.items():
            setattr(model, name, value)


def last_forward(model: nn.Module) -> ForwardRecord:
    """The record of the patched model's last forward pass (sizes, kinds, tokens and r per block, ...)."""
    require_patched(model, "regtome.last_forward")
    if model.regtome_record is None:
        raise RuntimeError("the model has not run since it was patched; call it on an input first")
    return model.regtome_record


def trace(model: nn.Module, images: torch.Tensor, blocks: Optional[Iterable[int]] = None) -> ForwardRecord:
    """One forward pass of `images` at the model's options that records every requested block.

    Returns the pass's `ForwardRecord`, whose ``blocks[i]`` holds the sizes, kinds and sources of the
    tokens after block i, for each i in `blocks` (default: every block). Sources are traced for
    this call only. Runs under the caller's grad mode; the model's last record becomes this one.
    """
    require_patched(model, "regtome.trace")
    depth = model.regtome_num_blocks
    wanted = list(range(depth)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in wanted if not -depth <= b < depth]
    if bad:
        raise ValueError(f"blocks must be in [{-depth}, {depth - 1}], got {bad}")
    with options(model, trace_source=True):
        _, record = model.regtome_features(images, keep=frozenset(b % depth for b in wanted))
    return record
