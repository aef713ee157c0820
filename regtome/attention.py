"""timm's self-attention, also returning the keys that token matching compares.

This mirrors `timm.layers.Attention.forward` step by step (QK-norm, scale-norm, gating, fused or
explicit attention) and adds one thing: proportional attention, a log(size) bias on the logits so
that a token standing for s patches counts s times as a key.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention


def size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, 1, T) from token sizes (B, T, 1): log(size) on every key."""
    return size.log().transpose(1, 2)[:, None].to(dtype)


def project_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's q, k (normed) and v, each (B, heads, T, head_dim)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_with_keys(
    attn: Attention,
    x: torch.Tensor,
    size: Optional[torch.Tensor] = None,
    return_keys: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run `attn` on `x`; return its output and the keys averaged over heads (B, T, head_dim).

    With `return_keys=False` (a block that merges nothing) the keys are not averaged: None.

    With `size` given, apply proportional attention; without it, the call is exactly timm's
    (fused `F.scaled_dot_product_attention` when timm uses it).
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = project_qkv(attn, x)
    bias = None if size is None else size_bias(size, q.dtype)

    if attn.fused_attn:
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        x = attn.attn_drop(logits.softmax(dim=-1)) @ v

    x = x.transpose(1, 2).reshape(B, N, attn.attn_dim)
    x = attn.norm(x)
    if gate is not None:
        x = x * gate
    x = attn.proj_drop(attn.proj(x))
    return x, k.mean(dim=1) if return_keys else None


@torch.no_grad()
def prefix_attention(model: nn.Module, images: torch.Tensor, block: int) -> tuple[torch.Tensor, list[str]]:
    """What each prefix token (class, distillation, registers) attends to among the patches.

    Runs the patched `model` without merging (r=0), so every patch keeps its own key, and returns
    the softmax attention of the prefix tokens present at `block` over the patch tokens,
    (B, heads, P, N), and their names (``"class"``, ``"distill"``, ``"register 1"``, ...).
    """
    from .patch.timm import options, prefix_names

    depth = len(model.blocks)
    if not -depth <= block < depth:
        raise ValueError(f"block must be in [{-depth}, {depth - 1}], got {block}")
    block = block % depth
    captured: dict[str, torch.Tensor] = {}
    # The attention's input is norm1's output (RegToMe calls the attention's layers, not attn itself).
    hook = model.blocks[block].norm1.register_forward_hook(lambda m, args, out: captured.setdefault("x", out))
    try:
        with options(model, r=0):
            model(images)
    finally:
        hook.remove()
    names = prefix_names(model, block)
    q, k, _ = project_qkv(model.blocks[block].attn, captured["x"])
    weights = ((q * model.blocks[block].attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)
    num_prefix = len(names)
    return weights[:, :, :num_prefix, num_prefix:], names
