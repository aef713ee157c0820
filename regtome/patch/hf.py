"""Patch a Hugging Face transformers vision model in place so that every layer merges tokens (RegToMe).

Supported: `ViTModel`, `DeiTModel` (class + distillation tokens), `Dinov2Model`,
`Dinov2WithRegistersModel` (class + registers), `DINOv3ViTModel` (class + registers, RoPE) and
`SiglipVisionModel` (no class token, attention-pooling head), and the classification models
built on them (`...ForImageClassification`, DeiT's with-teacher head, `SiglipForImageClassification`).

The encoder runs with merging (`regtome.forward.run_blocks`, `regtome.hf_blocks`); its output is
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

from ..forward import run_blocks
from ..hf_blocks import ATTENTION_IMPLEMENTATIONS, LAYERS, hf_layer_forward
from ..layout import DEFAULT_PROTECT, PrefixLayout, prefix_schedule
from ..record import ForwardRecord
from ..schedule import RSchedule
from ..tokens import unmerge_to_grid
from .common import PatchedModel, patched_class, set_options, validate

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
    Dinov2WithRegistersModel: Family(lambda m: m.encoder.layer, "layernorm",
                                     lambda m: m.embeddings.patch_embeddings.projection, 1),
    DINOv3ViTModel: Family(lambda m: m.model.layer, "norm", lambda m: m.embeddings.patch_embeddings, 1),
    SiglipVisionModel: Family(lambda m: m.encoder.layers, "post_layernorm", lambda m: m.embeddings.patch_embedding, 0),
}


def hf_layout(model: nn.Module) -> PrefixLayout:
    return PrefixLayout(num_class=FAMILIES[model._regtome_base].num_class,
                        num_register=int(getattr(model.config, "num_register_tokens", 0) or 0))


class RegToMeTransformersModel(PatchedModel):
    """Mixin placed in front of a transformers base model class by `regtome.patch.transformers`."""

    @property
    def regtome_layout(self) -> PrefixLayout:
        return hf_layout(self)

    @property
    def regtome_has_class(self) -> bool:
        return FAMILIES[self._regtome_base].num_class > 0

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder layers (the name timm uses, so FLOP counts read both alike)."""
        return FAMILIES[self._regtome_base].layers(self)

    @property
    def regtome_patch_conv(self) -> nn.Conv2d:
        return FAMILIES[self._regtome_base].patch_conv(self)

    @property
    def regtome_input_size(self) -> tuple[int, int, int]:
        size = self.config.image_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (self.config.num_channels, height, width)

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: Optional[torch.Tensor] = None,
                interpolate_pos_encoding: Optional[bool] = None, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs: Any) -> BaseModelOutputWithPooling:
        """transformers' forward with merging inside the encoder; outputs keep transformers' shapes."""
        _refuse(bool_masked_pos, attention_mask, output_attentions or self.config.output_attentions, kwargs)
        want_hidden = bool(output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states)
        depth = len(self.blocks)
        x, ropes = self._embed(pixel_values, interpolate_pos_encoding, depth)
        keep = frozenset(range(depth)) if want_hidden else frozenset()
        tokens, _, kept = self._run(x, ropes, keep)
        full = unmerge_to_grid(tokens.x, tokens.owner)
        hidden = None
        if want_hidden:  # the embeddings, then each layer's output on the full grid
            hidden = (x,) + tuple(unmerge_to_grid(kept[i].x, kept[i].owner) for i in range(depth))
        sequence = getattr(self, FAMILIES[self._regtome_base].final_norm)(full)
        return BaseModelOutputWithPooling(last_hidden_state=sequence, pooler_output=self._pool(sequence),
                                          hidden_states=hidden)

    def regtome_features(self, pixel_values: torch.Tensor, keep: frozenset = frozenset()
                         ) -> tuple[torch.Tensor, ForwardRecord]:
        """The merged tokens after the last layer (before the final norm) and the record of the pass."""
        x, ropes = self._embed(pixel_values, None, len(self.blocks))
        tokens, record, _ = self._run(x, ropes, keep)
        return tokens.x, record

    def _run(self, x: torch.Tensor, ropes: Optional[list], keep: frozenset):
        r_per_block = validate(self)
        layout = hf_layout(self)
        depth = len(self.blocks)
        tokens, record, kept = run_blocks(
            x, list(self.blocks), hf_layer_forward,
            prefix_schedule(layout, self.protect, self.class_layer, self.register_layer, depth),
            r_per_block, layout, self.protect, self.prop_attn, self.trace_source, ropes, keep, track_owner=True,
            grad_checkpointing=getattr(self, "gradient_checkpointing", False))
        self.regtome_record = record
        return tokens, record, kept

    def _embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: Optional[bool], depth: int
               ) -> tuple[torch.Tensor, Optional[list]]:
        """The embedded sequence [prefix | patches] as transformers builds it, and DINOv3's rotary table."""
        embeddings = self.embeddings
        pixel_values = pixel_values.to(self.regtome_patch_conv.weight.dtype)
        if isinstance(self, DINOv3ViTModel):
            cos, sin = self.rope_embeddings(pixel_values)
            identity = torch.cat([torch.ones_like(cos[:1]), torch.zeros_like(sin[:1])], dim=-1)
            table = torch.cat([identity, torch.cat([cos, sin], dim=-1)])  # row 0: no rotation (prefix)
            return embeddings(pixel_values), [table] * depth
        if interpolate_pos_encoding is not None:
            return embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding), None
        return embeddings(pixel_values), None

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
        raise ValueError("RegToMe does not merge masked inputs (bool_masked_pos, attention_mask); "
                         "call regtome.remove_patch(model) for masked-image modelling")
    if output_attentions:
        raise ValueError("output_attentions is not available on a RegToMe-patched model: merged layers attend over "
                         "fewer tokens than the grid; use regtome.prefix_attention or regtome.remove_patch(model)")
    if kwargs:
        raise ValueError(f"RegToMe's patched forward does not take {', '.join(sorted(kwargs))}")


class RegToMeWrapper:
    """Mixin for a classification model: its options and record are those of its patched base model."""

    def regtome_inner_models(self) -> list[nn.Module]:
        return [getattr(self, self._regtome_inner)]

    @property
    def regtome_num_blocks(self) -> int:
        return getattr(self, self._regtome_inner).regtome_num_blocks

    @property
    def regtome_layout(self) -> PrefixLayout:
        return getattr(self, self._regtome_inner).regtome_layout

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self, self._regtome_inner).blocks

    @property
    def regtome_patch_conv(self) -> nn.Conv2d:
        return getattr(self, self._regtome_inner).regtome_patch_conv

    @property
    def regtome_input_size(self) -> tuple[int, int, int]:
        return getattr(self, self._regtome_inner).regtome_input_size

    def regtome_features(self, pixel_values: torch.Tensor, keep: frozenset = frozenset()):
        return getattr(self, self._regtome_inner).regtome_features(pixel_values, keep)


def _delegated(name: str) -> property:
    def get(self: nn.Module) -> Any:
        return getattr(getattr(self, self._regtome_inner), name)

    def set_(self: nn.Module, value: Any) -> None:
        setattr(getattr(self, self._regtome_inner), name, value)

    return property(get, set_)


for _name in ("r", "prop_attn", "trace_source", "protect", "class_layer", "register_layer", "regtome_record"):
    setattr(RegToMeWrapper, _name, _delegated(_name))


def check_model(model: nn.Module) -> tuple[nn.Module, Optional[str]]:
    """The base model to patch (the model or its inner one) and the inner attribute; TypeError naming the
    reason for anything else."""
    inner_name = next((n for n in INNER if isinstance(getattr(model, n, None), tuple(FAMILIES))), None)
    base = getattr(model, inner_name) if inner_name else model
    base_class = getattr(base, "_regtome_base", type(base))
    if base_class not in FAMILIES:
        supported = ", ".join(c.__name__ for c in FAMILIES)
        raise TypeError(f"regtome.patch.transformers supports {supported} and their classification models, "
                        f"got {type(model).__name__}")
    implementation = base.config._attn_implementation
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise TypeError(f"attn_implementation={implementation!r} cannot take proportional attention's log(size) "
                        f"bias; load the model with attn_implementation='sdpa' or 'eager'")
    for i, layer in enumerate(FAMILIES[base_class].layers(base)):
        if type(layer) not in LAYERS:
            raise TypeError(f"layer {i} is a {type(layer).__name__}; RegToMe supports "
                            f"{', '.join(c.__name__ for c in LAYERS)}")
    return base, inner_name


def transformers(
    model: nn.Module,
    r: RSchedule = 0,
    prop_attn: bool = True,
    trace_source: bool = False,
    protect: str = DEFAULT_PROTECT,
    class_layer: int = 0,
    register_layer: int = 0,
) -> nn.Module:
    """Patch a transformers vision model in place for register-aware token merging and return it.

    The same options as `regtome.patch.timm` (see there); change them any time as attributes
    (``model.r = 16``) or with `regtome.options`. A classification model delegates its options and
    record to its base model, so either can be handed to `regtome.options` / `regtome.last_forward`.
    """
    base, inner_name = check_model(model)
    base_class = getattr(base, "_regtome_base", type(base))
    base.__class__ = patched_class(RegToMeTransformersModel, base_class)
    if inner_name is not None:
        outer_class = getattr(model, "_regtome_base", type(model))
        wrapper = patched_class(RegToMeWrapper, outer_class)
        wrapper._regtome_inner = inner_name
        model.__class__ = wrapper
    set_options(model, dict(r=r, prop_attn=prop_attn, trace_source=trace_source, protect=protect,
                            class_layer=class_layer, register_layer=register_layer))
    return model
