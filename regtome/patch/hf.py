"""Patch a Hugging Face transformers vision model in place so that every layer merges tokens (RegToMe).

Supported: `ViTModel`, `DeiTModel` (class + distillation tokens), `Dinov2Model`,
`Dinov2WithRegistersModel` (class + registers), `DINOv3ViTModel` (class + registers, RoPE) and
`SiglipVisionModel` (no class token, attention-pooling head), and the classification models
built on them (`...ForImageClassification`, DeiT's with-teacher head, `SiglipForImageClassification`).

The encoder runs with merging (`regtome.patch.base.PatchedModel`, `regtome.hf_blocks`); its output is
put back on the full token grid before the final norm: every patch slot takes the features of the
token it was merged into, prefix slots their own. So `last_hidden_state` has transformers' shape,
and every head reads it unchanged: a mean over patch slots is the size-weighted mean of the merged
tokens, and attention pooling over the grid is proportional attention (a token held s times counts s
times). RoPE (DINOv3): a merged token keeps its destination's position, class and registers stay
unrotated, as for timm's Eva (`regtome.rope`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn as nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.deit.modeling_deit import DeiTModel
from transformers.models.dinov2.modeling_dinov2 import Dinov2Model
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersModel
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTModel
from transformers.models.siglip.modeling_siglip import SiglipVisionModel
from transformers.models.vit.modeling_vit import ViTModel

from ..hf_blocks import ATTENTION_IMPLEMENTATIONS, LAYERS, hf_layer_forward
from ..layout import PrefixLayout
from ..parts import original_class
from ..patch_options import DEFAULTS, OPTIONS, PatchOptions
from ..record import ForwardRecord
from ..rope import rope_table
from ..schedule import RSchedule
from ..tokens import unmerge_to_grid
from ..upstream_hf import attn_implementation
from .base import Embedded, PatchedModel, patched_class, set_options

# The attribute that holds the base model inside each classification model transformers ships
# (and `backbone`, for a model of one's own around a base model).
INNER = ("vit", "deit", "dinov2", "dinov2_with_registers", "vision_model", "backbone")


class Family(NamedTuple):
    """How one transformers base model is laid out."""

    layers: Callable[[nn.Module], nn.ModuleList]
    final_norm: str
    patch_conv: Callable[[nn.Module], nn.Conv2d]
    num_class: int


FAMILIES: dict[type, Family] = {
    ViTModel: Family(lambda m: m.layers, "layernorm", lambda m: m.embeddings.patch_embeddings.projection, 1),
    DeiTModel: Family(lambda m: m.layers, "layernorm", lambda m: m.embeddings.patch_embeddings.projection, 2),
    Dinov2Model: Family(lambda m: m.encoder.layer, "layernorm", lambda m: m.embeddings.patch_embeddings.projection, 1),
    Dinov2WithRegistersModel: Family(
        lambda m: m.encoder.layer, "layernorm", lambda m: m.embeddings.patch_embeddings.projection, 1
    ),
    DINOv3ViTModel: Family(lambda m: m.model.layer, "norm", lambda m: m.embeddings.patch_embeddings, 1),
    SiglipVisionModel: Family(lambda m: m.encoder.layers, "post_layernorm", lambda m: m.embeddings.patch_embedding, 0),
}


class RegToMeTransformersModel(PatchedModel):
    """Mixin placed in front of a transformers base model class by `regtome.patch.transformers`."""

    regtome_block_forward = staticmethod(hf_layer_forward)

    # What a transformers base model (the class behind this mixin) provides, as read here.
    config: Any
    embeddings: nn.Module

    def _family(self) -> Family:
        return FAMILIES[original_class(self)]

    def regtome_blocks(self) -> list[nn.Module]:
        return list(self._family().layers(self))

    def regtome_layout(self) -> PrefixLayout:
        return PrefixLayout(
            num_class=self._family().num_class, num_register=int(getattr(self.config, "num_register_tokens", 0) or 0)
        )

    def regtome_patch_conv(self) -> nn.Conv2d:
        return self._family().patch_conv(self)

    def regtome_input_size(self) -> tuple[int, int, int]:
        size = self.config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.config.num_channels, height, width)

    def regtome_gradient_checkpointing(self) -> bool:
        return bool(getattr(self, "gradient_checkpointing", False))

    def regtome_embed(
        self, images: torch.Tensor, depth: int, interpolate_pos_encoding: Optional[bool] = None
    ) -> Embedded:
        """The embedded sequence [prefix | patches] as transformers builds it, and DINOv3's rotary table."""
        embeddings = self.embeddings
        images = images.to(self.regtome_patch_conv().weight.dtype)
        if isinstance(self, DINOv3ViTModel):
            cos, sin = self.rope_embeddings(images)
            return Embedded(embeddings(images), [rope_table(sin, cos)] * depth)
        if interpolate_pos_encoding is not None:
            return Embedded(embeddings(images, interpolate_pos_encoding=interpolate_pos_encoding))
        return Embedded(embeddings(images))

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: Optional[torch.Tensor] = None,
        interpolate_pos_encoding: Optional[bool] = None,
        attention_mask: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """transformers' forward with merging inside the encoder; outputs keep transformers' shapes."""
        _refuse(bool_masked_pos, attention_mask, output_attentions or self.config.output_attentions, kwargs)
        want_hidden = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        depth = self.regtome_num_blocks
        embedded = self.regtome_embed(pixel_values, depth, interpolate_pos_encoding)
        keep = frozenset(range(depth)) if want_hidden else frozenset()
        tokens, _, kept = self.regtome_run(embedded, keep=keep, track_owner=True)
        full = unmerge_to_grid(tokens.x, tokens.owner)
        hidden = None
        if want_hidden:  # the embeddings, then each layer's output on the full grid
            hidden = (embedded.x,) + tuple(unmerge_to_grid(kept[i].x, kept[i].owner) for i in range(depth))
        sequence = getattr(self, self._family().final_norm)(full)
        return BaseModelOutputWithPooling(
            last_hidden_state=sequence, pooler_output=self._pool(sequence), hidden_states=hidden
        )

    def _pool(self, sequence: torch.Tensor) -> Optional[torch.Tensor]:
        """transformers' pooler_output of each base model, from the full-grid sequence."""
        if isinstance(self, SiglipVisionModel):
            return self.head(sequence) if self.use_head else None
        pooler = getattr(self, "pooler", None)
        if isinstance(self, (ViTModel, DeiTModel)):
            return pooler(sequence) if pooler is not None else None
        return sequence[:, 0, :]


def _refuse(bool_masked_pos: Any, attention_mask: Any, output_attentions: Any, kwargs: dict) -> None:
    if bool_masked_pos is not None or attention_mask is not None:
        raise ValueError(
            "RegToMe does not merge masked inputs (bool_masked_pos, attention_mask); "
            "call regtome.remove_patch(model) for masked-image modelling"
        )
    if output_attentions:
        raise ValueError(
            "output_attentions is not available on a RegToMe-patched model: merged layers attend over "
            "fewer tokens than the grid; use regtome.prefix_attention or regtome.remove_patch(model)"
        )
    if kwargs:
        raise ValueError(f"RegToMe's patched forward does not take {', '.join(sorted(kwargs))}")


class RegToMeWrapper:
    """Mixin for a classification model: its options, record and hooks are those of its patched base model."""

    _regtome_inner: str

    def regtome_inner_models(self) -> list[nn.Module]:
        return [getattr(self, self._regtome_inner)]

    def _inner(self) -> RegToMeTransformersModel:
        return getattr(self, self._regtome_inner)

    @property
    def regtome_num_blocks(self) -> int:
        return self._inner().regtome_num_blocks

    def regtome_blocks(self) -> list[nn.Module]:
        return self._inner().regtome_blocks()

    def regtome_layout(self) -> PrefixLayout:
        return self._inner().regtome_layout()

    def regtome_patch_conv(self) -> nn.Conv2d:
        return self._inner().regtome_patch_conv()

    def regtome_input_size(self) -> tuple[int, int, int]:
        return self._inner().regtome_input_size()

    def regtome_features(
        self,
        images: torch.Tensor,
        keep: frozenset[int] = frozenset(),
        track_owner: bool = False,
        num_blocks: Optional[int] = None,
    ) -> tuple[torch.Tensor, ForwardRecord]:
        return self._inner().regtome_features(images, keep, track_owner, num_blocks)


def _delegated(name: str) -> property:
    def get(self: nn.Module) -> Any:
        return getattr(getattr(self, self._regtome_inner), name)

    def set_(self: nn.Module, value: Any) -> None:
        setattr(getattr(self, self._regtome_inner), name, value)

    return property(get, set_)


for _name in (*OPTIONS, "regtome_record", "regtome_track_owner", "regtome_size", "regtome_source", "regtome_tokens"):
    setattr(RegToMeWrapper, _name, _delegated(_name))


def check_model(model: nn.Module) -> tuple[nn.Module, Optional[str]]:
    """The base model to patch (the model or its inner one) and the inner attribute; TypeError naming the
    reason for anything else."""
    inner_name = next((n for n in INNER if isinstance(getattr(model, n, None), tuple(FAMILIES))), None)
    base = getattr(model, inner_name) if inner_name else model
    base_class = original_class(base)
    if base_class not in FAMILIES:
        supported = ", ".join(c.__name__ for c in FAMILIES)
        raise TypeError(
            f"regtome.patch.transformers supports {supported} and their classification models, "
            f"got {type(model).__name__}"
        )
    implementation = attn_implementation(base.config)
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise TypeError(
            f"attn_implementation={implementation!r} cannot take proportional attention's log(size) "
            f"bias; load the model with attn_implementation='sdpa' or 'eager'"
        )
    for i, layer in enumerate(FAMILIES[base_class].layers(base)):
        if type(layer) not in LAYERS:
            raise TypeError(
                f"layer {i} is a {type(layer).__name__}; RegToMe supports {', '.join(c.__name__ for c in LAYERS)}"
            )
    return base, inner_name


def transformers(
    model: nn.Module,
    r: RSchedule = DEFAULTS.r,
    prop_attn: bool = DEFAULTS.prop_attn,
    trace_source: bool = DEFAULTS.trace_source,
    protect: str = DEFAULTS.protect,
    class_layer: int = DEFAULTS.class_layer,
    register_layer: int = DEFAULTS.register_layer,
) -> nn.Module:
    """Patch a transformers vision model in place for register-aware token merging and return it.

    The same options as `regtome.patch.timm` (see there); change them any time as attributes
    (``model.r = 16``) or with `regtome.options`. A classification model delegates its options and
    record to its base model, so either can be handed to `regtome.options` / `regtome.last_forward`.
    """
    base, inner_name = check_model(model)
    base.__class__ = patched_class(RegToMeTransformersModel, original_class(base))
    if inner_name is not None:
        wrapper = patched_class(RegToMeWrapper, original_class(model))
        setattr(wrapper, "_regtome_inner", inner_name)  # noqa: B010  (a class attribute of the patched class)
        model.__class__ = wrapper
    set_options(model, PatchOptions(r, prop_attn, trace_source, protect, class_layer, register_layer))
    return model
