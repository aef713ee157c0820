"""Patch a timm `VisionTransformer` or `Eva` in place so that every block merges tokens (RegToMe).

Only the model's class is swapped (for a subclass that overrides `forward_features`, `pool`,
`forward_head` and `forward_intermediates`); the blocks keep timm's classes, and `regtome.blocks`
runs each family with a merge inside. The merging loop is `regtome.patch.base.PatchedModel`'s; this
module supplies timm's hooks (embedding, blocks, layout, patch embedding, input size) and heads.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Union

import torch
import torch.nn as nn
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from ..blocks import merging_block_forward
from ..layout import PrefixLayout
from ..parts import original_class, timm_input_size, timm_layout
from ..patch_options import DEFAULTS, PatchOptions
from ..pooling import attention_pool_bias, kinds_scattered, leading_unpooled, pooled, size_weighted_pool
from ..record import ForwardRecord
from ..rope import timm_rope_table
from ..schedule import RSchedule
from ..tokens import unmerge_to_grid
from ..upstream_timm import feature_take_indices, position_embed
from .base import Embedded, PatchedModel, patched_class, set_options, validate
from .timm_support import check_model


def embed(model: nn.Module, images: torch.Tensor, depth: int) -> Embedded:
    """timm's steps before the blocks: the full sequence [prefix | patches], and for RoPE models the
    rotary table of each block (`regtome.rope`; 'mixed' RoPE has one per block)."""
    if not isinstance(model, Eva):
        return Embedded(model.norm_pre(model.patch_drop(position_embed(model, model.patch_embed(images)))))
    x, rope = position_embed(model, model.patch_embed(images))
    if rope is None:
        return Embedded(model.norm_pre(x))
    table = timm_rope_table(rope)
    ropes = [table[i] for i in range(depth)] if getattr(model, "rope_mixed", False) else [table] * depth
    return Embedded(model.norm_pre(x), ropes)


class RegToMeVisionTransformer(PatchedModel):
    """Mixin placed in front of a timm VisionTransformer (or Eva) class by `regtome.patch.timm`.

    `forward` hands the token sizes of its own pass to the pooling; `forward_head` and `pool`
    called on their own use the record of the last `forward_features`, checked against the input.
    """

    regtome_block_forward = staticmethod(merging_block_forward)

    # What timm's VisionTransformer / Eva (the class behind this mixin) provide, as read here.
    blocks: nn.Sequential
    patch_embed: Any
    norm: nn.Module
    fc_norm: nn.Module
    head_drop: nn.Module
    head: nn.Module
    attn_pool: Optional[nn.Module]
    global_pool: str
    num_prefix_tokens: int
    grad_checkpointing: bool

    def regtome_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def regtome_layout(self) -> PrefixLayout:
        return timm_layout(self)

    def regtome_patch_conv(self) -> nn.Conv2d:
        return self.patch_embed.proj

    def regtome_input_size(self) -> tuple[int, int, int]:
        return timm_input_size(self)

    def regtome_embed(self, images: torch.Tensor, depth: int) -> Embedded:
        return embed(self, images, depth)

    def regtome_gradient_checkpointing(self) -> bool:
        return bool(self.grad_checkpointing)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        _refuse_masks(attn_mask, is_causal)
        x, record = self.regtome_features(x)
        return self._head(self.norm(x), record, pre_logits=False)

    def forward_features(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        _refuse_masks(attn_mask, is_causal)
        return self.norm(self.regtome_features(x)[0])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self._head(x, self._record_for(x), pre_logits)

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        return self._pool(x, self._record_for(x), pool_type)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, list[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ) -> Union[list[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]], dict[str, Any]]:
        """timm's `forward_intermediates` (same arguments, same output shapes) on the merged model.

        Features are computed with merging, then put back on timm's full sequence: every patch (and
        prefix token) takes the features of the token it was merged into (ToMe's unmerge), so a
        dense head sees timm's (B, C, H, W) grid. Registers never land on the patch grid under
        protect="prefix" or "apart". With r=0 in every block this is timm's own method.
        """
        r_per_block = validate(self)
        if not any(r_per_block) and self.class_layer == 0 and self.register_layer == 0:
            extra: dict[str, Any] = {"output_dict": True} if output_dict else {}  # Eva's method has none
            if attn_mask is not None or is_causal:
                extra.update(attn_mask=attn_mask, is_causal=is_causal)
            return self._regtome_base.forward_intermediates(
                self,
                x,
                indices=indices,
                return_prefix_tokens=return_prefix_tokens,
                norm=norm,
                stop_early=stop_early,
                output_fmt=output_fmt,
                intermediates_only=intermediates_only,
                **extra,
            )
        _refuse_masks(attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        batch, _, height, width = x.shape
        depth = max_index + 1 if stop_early else len(self.blocks)
        merged = self.regtome_run(
            self.regtome_embed(x, depth), keep=frozenset(take_indices), track_owner=True, depth=depth
        )
        tokens, kept = merged.tokens, merged.kept
        intermediates = [
            unmerge_to_grid(self.norm(t.x) if norm else t.x, t.owner) for t in (kept[i] for i in take_indices)
        ]
        p = self.num_prefix_tokens
        prefix_tokens = [y[:, :p] for y in intermediates] if p else None
        intermediates = [y[:, p:] for y in intermediates]
        if output_fmt == "NCHW":
            grid_h, grid_w = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [
                y.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
            ]
        final = None if intermediates_only else unmerge_to_grid(self.norm(tokens.x), tokens.owner)
        if output_dict:
            out: dict[str, Any] = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if final is not None:
                out["image_features"] = final
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        return intermediates if intermediates_only else (final, intermediates)

    def _record_for(self, x: torch.Tensor) -> ForwardRecord:
        """The last forward's record, if it describes `x` (same batch and token count)."""
        record = self.regtome_record
        if record is None or tuple(record.size.shape[:2]) != tuple(x.shape[:2]):
            raise RuntimeError(
                "forward_head/pool need the token sizes of the forward_features call that produced x; "
                "call forward_features on the same input first (or call the model itself)"
            )
        return record

    def _head(self, x: torch.Tensor, record: ForwardRecord, pre_logits: bool) -> torch.Tensor:
        """timm's `forward_head`, pooling with the sizes of `record`."""
        base_head = self._regtome_base.forward_head
        if base_head not in (VisionTransformer.forward_head, Eva.forward_head):  # DeiT's two heads
            return base_head(self, x, pre_logits)
        x = self._pool(x, record)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def _pool(self, x: torch.Tensor, record: ForwardRecord, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling over the tokens timm pools, each weighted by its size (`regtome.pooling`)."""
        include_prefix = isinstance(self, VisionTransformer) and self.pool_include_prefix
        if self.attn_pool is not None and isinstance(self, Eva):  # Eva's attention pool sees every token
            include_prefix = True
        if self.attn_pool is None:
            pool_type = self.global_pool if pool_type is None else pool_type
            if pool_type not in ("avg", "avgmax", "max"):
                return self._regtome_base.pool(self, x, pool_type)  # 'token' and '' do not depend on sizes
        keep, size = None, record.size
        if not include_prefix:
            if kinds_scattered(record):
                keep = pooled(record.kind, record.protect)
            else:  # the pooled tokens follow the prefix
                start = leading_unpooled(record)
                x, size, record = x[:, start:], size[:, start:], _sliced(record, start)
        if self.attn_pool is not None:
            return self.attn_pool(x, attn_mask=attention_pool_bias(record, x.dtype, keep))
        return size_weighted_pool(x, size, pool_type or self.global_pool, keep)


def _sliced(record: ForwardRecord, start: int) -> ForwardRecord:
    """The record's sizes and kinds from token `start` on (what a pool over the sliced tokens needs)."""
    return replace(record, size=record.size[:, start:], kind=record.kind[:, start:])


def _refuse_masks(attn_mask: Optional[torch.Tensor], is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ValueError("RegToMe does not support attn_mask/is_causal; call regtome.remove_patch(model) first")


def timm(
    model: VisionTransformer,
    r: RSchedule = DEFAULTS.r,
    prop_attn: bool = DEFAULTS.prop_attn,
    trace_source: bool = DEFAULTS.trace_source,
    protect: str = DEFAULTS.protect,
    class_layer: int = DEFAULTS.class_layer,
    register_layer: int = DEFAULTS.register_layer,
) -> VisionTransformer:
    """Patch `model` in place for register-aware token merging and return it.

    Args:
        model: a timm `VisionTransformer` (or subclass such as DeiT's distilled model) or `Eva`
            (DINOv3, EVA-02, the RoPE ViTs); blocks of the families in `regtome.blocks`.
        r: tokens merged per block: an int, a pair ``(r, inflection)`` or a list per block.
            Change it any time through ``model.r``.
        prop_attn: proportional attention (log(size) added to the attention logits).
        trace_source: keep ``model.regtome_source`` (B, T, N) for visualisation.
        protect: ``"apart"`` (the default) never merges class tokens and lets registers merge
            only with registers, patches only with patches; ``"prefix"`` never merges class,
            distillation or register tokens; ``"class"`` protects only class and distillation
            tokens (ToMe's behaviour, for ablations).
        class_layer: block at which the class (and distillation) token enters the network.
        register_layer: block at which the register tokens enter the network.
    """
    check_model(model)
    model.__class__ = patched_class(RegToMeVisionTransformer, original_class(model))
    set_options(model, PatchOptions(r, prop_attn, trace_source, protect, class_layer, register_layer))
    return model
