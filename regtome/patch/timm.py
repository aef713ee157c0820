"""Patch a timm `VisionTransformer` in place so that every block merges tokens (RegToMe).

Only the model's class is swapped (for a subclass that overrides `forward_features` and `pool`);
the blocks keep timm's classes and `forward`, so `forward_intermediates` and friends still run the
unmerged model. Per-forward state (sizes, sources) travels through arguments, not shared lists.

Token layout timm builds: ``[class, (distillation), registers..., patches...]``. The first group
(class + distillation, "class tokens") and the registers are the prefix. With ``protect="prefix"``
the whole prefix is protected; with ``protect="class"`` only the class tokens are, as in ToMe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from ..attention import attention_with_keys
from ..merge import bipartite_soft_matching, merge_source, merge_wavg
from ..schedule import RSchedule, parse_r

PROTECT_MODES = ("prefix", "class")
_OPTIONS = ("r", "prop_attn", "trace_source", "protect", "class_layer", "register_layer")
_OUTPUTS = ("regtome_size", "regtome_source", "regtome_tokens")


@dataclass(frozen=True)
class PrefixLayout:
    """How many class tokens (class + distillation) and register tokens lead the sequence."""

    num_class: int
    num_register: int

    @property
    def num_prefix(self) -> int:
        return self.num_class + self.num_register


def prefix_layout(model: VisionTransformer) -> PrefixLayout:
    num_register = int(getattr(model, "num_reg_tokens", 0) or 0)
    return PrefixLayout(num_class=model.num_prefix_tokens - num_register, num_register=num_register)


def num_protected_tokens(layout: PrefixLayout, protect: str, class_present: bool, registers_present: bool) -> int:
    """Protected tokens at the front of the sequence, given which prefix groups have entered."""
    protected = layout.num_class if class_present else 0
    if protect == "prefix" and registers_present:
        protected += layout.num_register
    return protected


def merge_block_forward(
    block: Block,
    x: torch.Tensor,
    size: torch.Tensor,
    source: Optional[torch.Tensor],
    r: int,
    num_protected: int,
    prop_attn: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """timm's `Block.forward` with a merge between attention and MLP.

    `prop_attn` applies the log(size) bias; the caller turns it off while all sizes are 1 so that
    attention then runs through timm's exact (fused) path.
    """
    attn_out, keys = attention_with_keys(block.attn, block.norm1(x), size if prop_attn else None, return_keys=r > 0)
    x = x + block.drop_path1(block.ls1(attn_out))
    if r > 0:
        merge, _ = bipartite_soft_matching(keys, r, num_protected)
        x, size = merge_wavg(merge, x, size)
        source = merge_source(merge, source)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size, source


class RegToMeVisionTransformer:
    """Mixin placed in front of a timm VisionTransformer class by `regtome.patch.timm`."""

    r: RSchedule
    prop_attn: bool
    trace_source: bool
    protect: str
    class_layer: int
    register_layer: int

    def forward_features(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("RegToMe does not support attn_mask/is_causal; call regtome.remove_patch(model) first")
        r_per_block = _check_options(self)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x, size, source, tokens = self._merge_blocks(x, r_per_block)
        self.regtome_size, self.regtome_source, self.regtome_tokens = size, source, tokens
        return self.norm(x)

    def _merge_blocks(
        self, x: torch.Tensor, r_per_block: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], list[int]]:
        """Run every block with merging; prefix groups join at `class_layer` / `register_layer`."""
        layout = prefix_layout(self)
        nc, p = layout.num_class, layout.num_prefix
        batch, num_tokens = x.shape[:2]
        class_tokens, register_tokens, x = x[:, :nc], x[:, nc:p], x[:, p:]
        class_entry = self.class_layer if nc else -1
        register_entry = self.register_layer if layout.num_register else -1

        # Sources index the full timm sequence, so prefix rows are one-hot on their own slot
        # even when the prefix enters late. Sizes stay fp32 under autocast.
        eye = None
        if self.trace_source:
            eye = torch.eye(num_tokens, device=x.device, dtype=x.dtype)[None].expand(batch, -1, -1)
        source = eye[:, p:] if eye is not None else None
        size = x.new_ones(batch, x.shape[1], 1, dtype=torch.float32)
        merged_any, tokens = False, []

        for i, block in enumerate(self.blocks):
            if i == class_entry:
                x, size, source = _insert(x, size, source, class_tokens, eye, 0, nc, at=0)
            if i == register_entry:
                at = nc if 0 <= class_entry <= i else 0
                x, size, source = _insert(x, size, source, register_tokens, eye, nc, p, at=at)
            num_protected = num_protected_tokens(
                layout, self.protect, 0 <= class_entry <= i, 0 <= register_entry <= i
            )
            tokens_before = x.shape[1]
            args = (block, x, size, source, r_per_block[i], num_protected, self.prop_attn and merged_any)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, size, source = checkpoint(merge_block_forward, *args, use_reentrant=False)
            else:
                x, size, source = merge_block_forward(*args)
            merged_any = merged_any or x.shape[1] < tokens_before
            tokens.append(x.shape[1])
        return x, size, source, tokens

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """timm's pooling, with averages weighted by token size (a merged token counts as its patches)."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type not in ("avg", "avgmax"):
            return super().pool(x, pool_type)  # 'token', 'max', '' do not depend on sizes
        size = self.regtome_size.to(x.dtype)
        if not self.pool_include_prefix:
            skip = num_protected_tokens(prefix_layout(self), self.protect, True, True)
            x, size = x[:, skip:], size[:, skip:]
        mean = (x * size).sum(dim=1) / size.sum(dim=1)
        return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)


def _insert(
    x: torch.Tensor,
    size: torch.Tensor,
    source: Optional[torch.Tensor],
    new_tokens: torch.Tensor,
    eye: Optional[torch.Tensor],
    first: int,
    stop: int,
    at: int,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Insert prefix tokens (size 1) at position `at`; their sources are rows first:stop of `eye`."""
    new_size = size.new_ones(size.shape[0], new_tokens.shape[1], 1)
    x = torch.cat([x[:, :at], new_tokens, x[:, at:]], dim=1)
    size = torch.cat([size[:, :at], new_size, size[:, at:]], dim=1)
    if source is not None:
        source = torch.cat([source[:, :at], eye[:, first:stop], source[:, at:]], dim=1)
    return x, size, source


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"regtome.patch.timm needs a timm VisionTransformer (or subclass), got {type(model).__name__}")
    for i, block in enumerate(model.blocks):
        if not isinstance(block, Block):
            raise TypeError(
                f"block {i} is a {type(block).__name__}; RegToMe supports timm's vision_transformer.Block only"
            )
        if not isinstance(block.attn, Attention):
            raise TypeError(
                f"block {i} uses {type(block.attn).__name__}; RegToMe supports timm.layers.Attention only"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise ValueError(
            f"global_pool={model.global_pool!r} (attention pooling) cannot weigh merged tokens; "
            "use a model with 'token' or 'avg' pooling"
        )


def _check_options(model: nn.Module) -> list[int]:
    """Validate the patch options (they may change between calls); return the per-block r."""
    r_per_block = parse_r(len(model.blocks), model.r)
    if model.protect not in PROTECT_MODES:
        raise ValueError(f"protect must be one of {PROTECT_MODES}, got {model.protect!r}")
    layout, depth = prefix_layout(model), len(model.blocks)
    for name, count, what in (
        ("class_layer", layout.num_class, "a class token"),
        ("register_layer", layout.num_register, "register tokens"),
    ):
        layer = getattr(model, name)
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < depth:
            raise ValueError(f"{name} must be an int in [0, {depth - 1}], got {layer!r}")
        if layer > 0 and count == 0:
            raise ValueError(f"{name}={layer} but the model has no {what}; set {name}=0")
    return r_per_block


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"RegToMe{cls.__name__}", (RegToMeVisionTransformer, cls), {"_regtome_base": cls})
    return _PATCHED_CLASSES[cls]


def timm(
    model: VisionTransformer,
    r: RSchedule = 0,
    prop_attn: bool = True,
    trace_source: bool = False,
    protect: str = "prefix",
    class_layer: int = 0,
    register_layer: int = 0,
) -> VisionTransformer:
    """Patch `model` in place for register-aware token merging and return it.

    Args:
        model: a timm `VisionTransformer` (or subclass such as DeiT's distilled model).
        r: tokens merged per block: an int, a pair ``(r, inflection)`` or a list per block.
            Change it any time through ``model.r``.
        prop_attn: proportional attention (log(size) added to the attention logits).
        trace_source: keep ``model.regtome_source`` (B, T, N) for visualisation.
        protect: ``"prefix"`` never merges class, distillation or register tokens;
            ``"class"`` protects only class and distillation tokens (ToMe's behaviour, for ablations).
        class_layer: block at which the class (and distillation) token enters the network.
        register_layer: block at which the register tokens enter the network.
    """
    _check_model(model)
    base = getattr(model, "_regtome_base", type(model))
    model.__class__ = _patched_class(base)
    options = dict(r=r, prop_attn=prop_attn, trace_source=trace_source, protect=protect,
                   class_layer=class_layer, register_layer=register_layer)
    for name, value in options.items():
        setattr(model, name, value)
    try:
        _check_options(model)
    except ValueError:
        remove_patch(model)
        raise
    model.regtome_size, model.regtome_source, model.regtome_tokens = None, None, []
    return model


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo `regtome.patch.timm`: restore the original class and drop RegToMe's attributes."""
    base = getattr(type(model), "_regtome_base", None)
    if base is None:
        return model
    model.__class__ = base
    for name in _OPTIONS + _OUTPUTS:
        model.__dict__.pop(name, None)
    return model
