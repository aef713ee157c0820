"""The public functions on a patched model: `options`, `last_forward`, `trace`, `dense_features`,
`forward_with_token_map`. They work through the `PatchedModel` contract only, the same for timm and
transformers; what a model is made of (`prefix_layout`, `input_size`, `patch_grid`) is `regtome.parts`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn as nn

from ..parts import (  # noqa: F401  (model_parts ... input_size: their earlier home, kept for old imports)
    ModelParts,
    current_options,
    input_size,
    model_parts,
    patch_grid,
    prefix_layout,
    require_patched,
)
from ..patch_options import OPTIONS
from ..record import ForwardRecord
from ..tokens import unmerge_to_grid
from .base import validate


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


def check_block(model: nn.Module, block: int, name: str) -> int:
    """`block` as an index in [0, depth) (negative ones count from the end); ValueError naming `name`."""
    depth = model.regtome_num_blocks
    if not -depth <= block < depth:
        raise ValueError(f"{name} must be in [{-depth}, {depth - 1}], got {block}")
    return block % depth


def _blocks(model: nn.Module, blocks: Optional[Iterable[int]]) -> list[int]:
    depth = model.regtome_num_blocks
    wanted = list(range(depth)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in wanted if not -depth <= b < depth]
    if bad:
        raise ValueError(f"blocks must be in [{-depth}, {depth - 1}], got {bad}")
    return [b % depth for b in wanted]


def trace(model: nn.Module, images: torch.Tensor, blocks: Optional[Iterable[int]] = None) -> ForwardRecord:
    """One forward pass of `images` at the model's options that records every requested block.

    Returns the pass's `ForwardRecord`, whose ``blocks[i]`` holds the sizes, kinds and sources of the
    tokens after block i, for each i in `blocks` (default: every block). Sources are traced for
    this call only. Runs under the caller's grad mode; the model's last record becomes this one.
    """
    require_patched(model, "regtome.trace")
    wanted = _blocks(model, blocks)
    with options(model, trace_source=True):
        _, record = model.regtome_features(images, keep=frozenset(wanted))
    return record


def dense_features(model: nn.Module, images: torch.Tensor, block: int = -1) -> torch.Tensor:
    """(B, C, H, W) patch features after `block` on the full patch grid, before any final norm: the blocks
    run with merging, and every patch takes the features of the token that holds it (ToMe's unmerge).
    At r=0 these are the unmerged model's features of that block."""
    require_patched(model, "regtome.dense_features")
    (index,) = _blocks(model, [block])
    _, record = model.regtome_features(images, keep=frozenset({index}), track_owner=True, num_blocks=index + 1)
    state = record.blocks[index]
    grid = unmerge_to_grid(state.x, state.owner)[:, record.layout.num_prefix :]
    rows, cols = patch_grid(model, *images.shape[-2:])
    return grid.reshape(len(images), rows, cols, -1).permute(0, 3, 1, 2)


def forward_with_token_map(model: nn.Module, images: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """``model(images)`` and, from that same pass, the token map (B, N): for every slot of the model's
    sequence, the index of the output token that holds it (every merge decision of the pass)."""
    require_patched(model, "regtome.forward_with_token_map")
    previous = model.regtome_track_owner
    model.regtome_track_owner = True
    try:
        output = model(images)
    finally:
        model.regtome_track_owner = previous
    return output, model.regtome_record.owner
