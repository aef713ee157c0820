"""The patched model: one contract for timm and transformers, and the class swap that applies it.

A patch swaps a model's class for a subclass (`patched_class`) that puts a `PatchedModel` in front
of the original class and remembers it as `_regtome_base`. `PatchedModel` owns the merging forward
(`regtome_features`, `regtome_run`); each source (`regtome.patch.timm`, `regtome.patch.hf`) supplies
only its own parts as small hooks:

    regtome_blocks()         the blocks (timm's `blocks`, a transformers encoder's layers)
    regtome_layout()         the prefix: class/distillation and register tokens
    regtome_patch_conv()     the convolution that cuts the image into patches
    regtome_input_size()     (C, H, W) the model was built for
    regtome_embed(images, depth)   the full sequence [prefix | patches] and rotary tables per block
    regtome_block_forward    one block with a merge inside (a function of the source's blocks module)
    regtome_gradient_checkpointing()

The options are plain attributes (``model.r = 16``), checked before every pass.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn

from ..forward import BlockForward, run_blocks
from ..layout import PrefixLayout, prefix_schedule
from ..parts import is_patched, original_class, require_patched  # noqa: F401  (require_patched: old imports)
from ..patch_options import OPTIONS, PatchOptions, check_options, model_options
from ..protection import protection
from ..record import ForwardRecord
from ..schedule import RSchedule
from ..tokens import Tokens

_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


class Embedded(NamedTuple):
    """The embedded image: x (B, N, C), the model's full sequence ``[class tokens | registers | patches]``;
    ropes: the rotary table of each block (`regtome.rope.rope_table`) for RoPE models, else None."""

    x: torch.Tensor
    ropes: Optional[list[torch.Tensor]] = None


class MergedPass(NamedTuple):
    """One merging pass: the final tokens, its record, and the tokens after each block it was asked to keep."""

    tokens: Tokens
    record: ForwardRecord
    kept: dict[int, Tokens]


class PatchedModel:
    """What every patched model is: the options as plain attributes, the record of its last pass,
    the merging forward, and the hooks its source fills in (see the module docstring)."""

    r: RSchedule
    prop_attn: bool
    trace_source: bool
    protect: str
    class_layer: int
    register_layer: int
    regtome_record: Optional[ForwardRecord] = None
    regtome_track_owner: bool = False  # set for one call by `regtome.forward_with_token_map`
    _regtome_base: Any  # the original class (set on the class `patched_class` makes)

    # --- the hooks of each source ---------------------------------------------------------------------
    regtome_block_forward: BlockForward

    def regtome_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def regtome_layout(self) -> PrefixLayout:
        raise NotImplementedError

    def regtome_patch_conv(self) -> nn.Conv2d:
        raise NotImplementedError

    def regtome_input_size(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def regtome_embed(self, images: torch.Tensor, depth: int) -> Embedded:
        raise NotImplementedError

    def regtome_gradient_checkpointing(self) -> bool:
        return False

    def regtome_inner_models(self) -> list[nn.Module]:
        """Patched models inside this one (a transformers classifier's base model); none here."""
        return []

    # --- shared by every source -----------------------------------------------------------------------
    @property
    def regtome_num_blocks(self) -> int:
        return len(self.regtome_blocks())

    # Read-only views of the last record, kept for code written against the first release.
    @property
    def regtome_size(self) -> Optional[torch.Tensor]:
        return None if self.regtome_record is None else self.regtome_record.size

    @property
    def regtome_source(self) -> Optional[torch.Tensor]:
        return None if self.regtome_record is None else self.regtome_record.source

    @property
    def regtome_tokens(self) -> list[int]:
        return [] if self.regtome_record is None else list(self.regtome_record.tokens)

    def regtome_features(
        self,
        images: torch.Tensor,
        keep: frozenset[int] = frozenset(),
        track_owner: bool = False,
        num_blocks: Optional[int] = None,
    ) -> tuple[torch.Tensor, ForwardRecord]:
        """The merged tokens after the last block (before any final norm) and the record of the pass.

        keep: blocks whose tokens the record keeps (``record.blocks``). track_owner: also follow which
        token holds every slot of the model's sequence (``record.owner``). num_blocks: stop after that
        many blocks."""
        depth = self.regtome_num_blocks if num_blocks is None else num_blocks
        merged = self.regtome_run(self.regtome_embed(images, depth), keep=keep, track_owner=track_owner, depth=depth)
        return merged.tokens.x, merged.record

    def regtome_run(
        self,
        embedded: Embedded,
        keep: frozenset[int] = frozenset(),
        track_owner: bool = False,
        depth: Optional[int] = None,
    ) -> MergedPass:
        """The blocks on an embedded sequence, merging at the model's options; the record becomes the last one."""
        r_per_block = validate(self)
        layout = self.regtome_layout()
        blocks = self.regtome_blocks()[:depth]
        mode = protection(self.protect)
        tokens, record, kept = run_blocks(
            embedded.x,
            blocks=blocks,
            block_forward=self.regtome_block_forward,
            prefixes=prefix_schedule(layout, mode, self.class_layer, self.register_layer, len(blocks)),
            r_per_block=r_per_block,
            layout=layout,
            protection=mode,
            prop_attn=self.prop_attn,
            trace_source=self.trace_source,
            ropes=embedded.ropes,
            keep=keep,
            track_owner=track_owner or self.regtome_track_owner,
            grad_checkpointing=self.regtome_gradient_checkpointing(),
        )
        self.regtome_record = record
        return MergedPass(tokens, record, kept)


def patched_class(mixin: type, cls: type) -> type:
    """The class `RegToMe<cls>`: `mixin` in front of `cls`, made once per pair."""
    key = (mixin, cls)
    if key not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[key] = type(f"RegToMe{cls.__name__}", (mixin, cls), {"_regtome_base": cls})
    return _PATCHED_CLASSES[key]


def validate(model: Any) -> list[int]:
    """The model's options checked (ValueError naming the bad one); returns r per block."""
    return check_options(model_options(model), model.regtome_layout(), model.regtome_num_blocks)


def set_options(model: nn.Module, options: PatchOptions) -> None:
    """Set the options of a freshly patched model; undo the patch and raise if one is invalid."""
    for name, value in options.as_dict().items():
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
    if not is_patched(model):
        return model
    for inner in model.regtome_inner_models():
        remove_patch(inner)
    model.__class__ = original_class(model)
    for name in OPTIONS + ("regtome_record", "regtome_track_owner"):
        model.__dict__.pop(name, None)
    return model
