"""One Hugging Face transformers encoder layer with a merge inside (ViT, DeiT, DINOv2, DINOv2 with
registers, DINOv3, SigLIP).

Every one of these layers is a pre-norm block, ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``,
with its own attribute names; `LAYERS` holds them. The attention is transformers' own: the layer's
q/k/v projections, then the attention function its config selects (``eager`` or ``sdpa``, with the
modeling file's own eager function), with proportional attention as the additive ``attention_mask``
(log(size) on every key, before the softmax). The merge sits between the attention and the MLP, with
the keys (before any rotation) averaged over heads as the metric, as for timm.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.deit.modeling_deit import DeiTLayer
from transformers.models.dinov2.modeling_dinov2 import Dinov2Layer
from transformers.models.dinov2_with_registers.modeling_dinov2_with_registers import Dinov2WithRegistersLayer
from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTLayer
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer
from transformers.models.vit.modeling_vit import ViTLayer

from .attention import size_bias
from .layout import BlockPrefix
from .merge import merge_tokens
from .rope import rope_for_tokens, rotate
from .tokens import Tokens
from .upstream_hf import attn_implementation, eager_attention

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")


class LayerNames(NamedTuple):
    """Attribute names of a pre-norm layer; None where the layer has no such step."""

    norm1: str
    attention: str
    scale1: Optional[str]
    drop: Optional[str]
    norm2: str
    scale2: Optional[str]


VIT_NAMES = LayerNames("layernorm_before", "attention", None, "dropout", "layernorm_after", None)
DINO_NAMES = LayerNames("norm1", "attention", "layer_scale1", "drop_path", "norm2", "layer_scale2")
LAYERS: dict[type, LayerNames] = {
    ViTLayer: VIT_NAMES,
    DeiTLayer: VIT_NAMES,
    Dinov2Layer: DINO_NAMES,
    Dinov2WithRegistersLayer: DINO_NAMES,
    DINOv3ViTLayer: DINO_NAMES,
    SiglipEncoderLayer: LayerNames("layer_norm1", "self_attn", None, None, "layer_norm2", None),
}


def _step(layer: nn.Module, name: Optional[str]) -> nn.Module:
    return nn.Identity() if name is None else getattr(layer, name)


def hf_attention(
    attn: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor], rope: Optional[torch.Tensor], return_keys: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """transformers' attention module on x (B, T, C): output and keys averaged over heads (B, T, head_dim).

    rope: (B, 1, T, 2 * head_dim) rotary rows per token (DINOv3; `regtome.rope`), identity rows for prefix tokens."""
    batch, tokens, _ = x.shape
    shape = (batch, tokens, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    keys = k.mean(dim=1) if return_keys else None
    if rope is not None:  # transformers rotates the two halves of each head
        q, k = rotate(q, rope, half=True), rotate(k, rope, half=True)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn_implementation(attn.config), eager_attention(attn))
    dropout = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))
    scaling = getattr(attn, "scaling", getattr(attn, "scale", None))
    out, _ = attend(attn, q, k, v, bias, dropout=dropout if attn.training else 0.0, scaling=scaling)
    output = getattr(attn, "o_proj", None) or attn.out_proj
    return output(out.reshape(batch, tokens, -1).contiguous()), keys


def hf_layer_forward(
    layer: nn.Module, tokens: Tokens, r: int, prefix: BlockPrefix, prop_attn: bool, rope: Optional[torch.Tensor] = None
) -> Tokens:
    """One transformers layer with up to r merges between its attention and its MLP."""
    names = LAYERS[type(layer)]
    bias = size_bias(tokens.size, tokens.x.dtype) if prop_attn else None
    rows = None if rope is None else rope_for_tokens(rope, tokens.position)
    attn_out, keys = hf_attention(
        getattr(layer, names.attention), getattr(layer, names.norm1)(tokens.x), bias, rows, return_keys=r > 0
    )
    drop = _step(layer, names.drop)
    tokens = tokens._replace(x=tokens.x + drop(_step(layer, names.scale1)(attn_out)))
    tokens = merge_tokens(tokens, keys, r, prefix)
    update = _step(layer, names.scale2)(layer.mlp(getattr(layer, names.norm2)(tokens.x)))
    return tokens._replace(x=tokens.x + drop(update))
