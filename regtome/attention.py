"""timm's self-attention, also returning the keys that token matching compares.

This mirrors `timm.layers.Attention.forward` step by step (QK-norm, scale-norm, gating, fused or
explicit attention) and adds one thing: proportional attention, a log(size) bias on the logits so
that a token standing for s patches counts s times as a key.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import Attention


def size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, 1, T) from token sizes (B, T, 1): log(size) on every key."""
    return size.log().transpose(1, 2)[:, None].to(dtype)


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
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
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
