"""What the prefix tokens (class, distillation, registers / storage tokens) attend to."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block

from .attention import project_qkv, rotary_qkv
from .layout import prefix_names
from .patch.common import options
from .patch.timm import embed
from .rope import initial_positions, rope_for_tokens


def _queries_and_keys(model: nn.Module, block: int, x: torch.Tensor, images: torch.Tensor,
                      num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, heads, T, head_dim) queries and keys that block `block` computes from its attention input `x`."""
    attn = model.blocks[block].attn
    if type(attn) is Attention:
        q, k, _ = project_qkv(attn, x)
        return q, k
    rope = None
    _, table = embed(model, images)
    if table is not None:
        if getattr(model, "rope_mixed", False):  # one table per block
            table = table[block]
        rope = rope_for_tokens(table, initial_positions(x.shape[0], num_prefix, x.shape[1] - num_prefix, x.device))
    q, k, _, _ = rotary_qkv(attn, x, rope)
    return q, k


@torch.no_grad()
def prefix_attention(model: nn.Module, images: torch.Tensor, block: int) -> tuple[torch.Tensor, list[str]]:
    """What each prefix token (class, distillation, registers) attends to among the patches.

    Runs the patched `model` without merging (r=0), so every patch keeps its own key, and returns
    the softmax attention of the prefix tokens present at `block` over the patch tokens,
    (B, heads, P, N), and their names (``"class"``, ``"distill"``, ``"register 1"``, ...). DINOv3's
    storage tokens are its registers. Pre-norm blocks with timm's `Attention` or Eva's rotary attention.
    """
    depth = len(model.blocks)
    if not -depth <= block < depth:
        raise ValueError(f"block must be in [{-depth}, {depth - 1}], got {block}")
    block = block % depth
    target = model.blocks[block]
    if type(target) not in (Block, EvaBlock) or type(target.attn) is not Attention and not hasattr(target.attn, "rotate_half"):
        raise TypeError(f"prefix_attention supports pre-norm blocks with timm's Attention or Eva's rotary attention, "
                        f"not {type(target).__name__} with {type(target.attn).__name__}")
    captured: dict[str, Optional[torch.Tensor]] = {}
    # The attention's input is norm1's output (RegToMe calls the attention's layers, not attn itself).
    hook = target.norm1.register_forward_hook(lambda m, args, out: captured.setdefault("x", out))
    try:
        with options(model, r=0):
            model(images)
    finally:
        hook.remove()
    names = prefix_names(model, block)
    q, k = _queries_and_keys(model, block, captured["x"], images, len(names))
    weights = ((q * target.attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
    return weights[:, :, :len(names), len(names):], names
