"""What RegToMe reads of a model, patched or not: is it patched, its blocks, prefix layout, patch convolution,
input size and options. A patched model answers through its hooks (`regtome.patch.base.PatchedModel`); an
unpatched timm VisionTransformer / Eva through its own attributes. The FLOP count and the FLOP budget read
models only through here, so the core never imports `regtome.patch`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.nn as nn
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from .layout import PrefixLayout
from .patch_options import DEFAULTS, model_options

TIMM_MODELS = (VisionTransformer, Eva)


class ModelParts(NamedTuple):
    """What the FLOP count and the layout read of a model."""

    blocks: list[nn.Module]
    layout: PrefixLayout
    patch_conv: nn.Conv2d
    input_size: tuple[int, int, int]


def is_patched(model: Any) -> bool:
    """True for a model patched by `regtome.patch.timm` or `regtome.patch.transformers`."""
    return getattr(type(model), "_regtome_base", None) is not None


def original_class(model: nn.Module) -> type:
    """The model's class before the patch (its own class when it is not patched)."""
    return getattr(type(model), "_regtome_base", None) or type(model)


def require_patched(model: Any, what: str) -> None:
    if not is_patched(model):
        raise TypeError(
            f"{what} needs a model patched with regtome.patch.timm or regtome.patch.transformers, "
            f"got {type(model).__name__}"
        )


def timm_layout(model: nn.Module) -> PrefixLayout:
    """The prefix of a timm VisionTransformer / Eva: `reg_token` holds the registers (DINOv3's storage tokens)."""
    reg_token = getattr(model, "reg_token", None)
    num_register = 0 if reg_token is None else int(reg_token.shape[1])
    return PrefixLayout(num_class=model.num_prefix_tokens - num_register, num_register=num_register)


def timm_input_size(model: nn.Module) -> tuple[int, int, int]:
    return (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)


def model_parts(model: nn.Module) -> ModelParts:
    """The parts of a patched model (its hooks), or of an unpatched timm VisionTransformer / Eva."""
    if is_patched(model):
        return ModelParts(
            model.regtome_blocks(), model.regtome_layout(), model.regtome_patch_conv(), model.regtome_input_size()
        )
    if not isinstance(model, TIMM_MODELS):
        raise TypeError(
            f"expected a timm VisionTransformer or Eva, or a model patched by regtome.patch.timm or "
            f"regtome.patch.transformers; got {type(model).__name__}"
        )
    return ModelParts(list(model.blocks), timm_layout(model), model.patch_embed.proj, timm_input_size(model))


def current_options(model: nn.Module) -> dict[str, Any]:
    """The patch options of a patched model; the defaults at r=0 for an unpatched one."""
    return model_options(model) if is_patched(model) else DEFAULTS.as_dict()


def prefix_layout(model: nn.Module) -> PrefixLayout:
    """The prefix (class/distillation and register tokens) of a patched model or of a timm ViT."""
    return model_parts(model).layout


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model was built for."""
    return model_parts(model).input_size


def patch_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The patch grid (rows, columns) of a (height, width) image."""
    stride = model_parts(model).patch_conv.stride
    return height // stride[0], width // stride[1]
