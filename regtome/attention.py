"""timm's self-attention, also returning the keys that token matching compares.

Two mirrors of timm's attention, step by step, each adding one thing: proportional attention, a
log(size) bias on the logits so that a token standing for s patches counts s times as a key.

- `attention_with_keys`: `timm.layers.Attention` (QK-norm, scale-norm, gating, fused or explicit).
- `rope_attention_with_keys`: the rotary attention of timm's Eva models (`EvaAttention`,
  `AttentionRope`: separate or fused q/k/v, grouped-query heads), with one rotary embedding per
  token (see `regtome.rope`) instead of timm's fixed count of leading tokens without one.

Other attention modules (timm's DiffAttention, the parallel blocks) are run as timm wrote them,
with the bias passed as their `attn_mask`; `call_observing_keys` reads their keys on the way.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention

from .rope import rotate


def size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, 1, T) from token sizes (B, T, 1): log(size) on every key."""
    return size.log().transpose(1, 2)[:, None].to(dtype)


def attention_logits(
    q: torch.Tensor, k: torch.Tensor, scale: float, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(B, heads, T, T) logits of timm's unfused attention: q k^T * scale, plus an additive bias (log(size))."""
    logits = (q * scale) @ k.transpose(-2, -1)
    return logits if bias is None else logits + bias


def project_qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's q, k (normed) and v, each (B, heads, T, head_dim)."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def project_rope_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (normed, not yet rotated) and v of timm's `EvaAttention` / `AttentionRope`, (B, heads, T, head_dim).

    k and v have `num_kv_heads` heads under grouped-query attention."""
    B, N, _ = x.shape
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)  # EvaAttention keeps q/v biases apart (k has none)
        if q_bias is None:
            qkv = attn.qkv(x)
        elif attn.qkv_bias_separate:
            qkv = attn.qkv(x) + torch.cat((q_bias, attn.k_bias, attn.v_bias))
        else:
            qkv = F.linear(x, weight=attn.qkv.weight, bias=torch.cat((q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    return attn.q_norm(q), attn.k_norm(k), v


def _attend(
    attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v, through SDPA when timm uses it (the same call timm makes)."""
    if attn.fused_attn:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    return attn.attn_drop(attention_logits(q, k, attn.scale, bias).softmax(dim=-1)) @ v


def _output(attn: nn.Module, x: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, heads, T, head_dim) -> timm's output projection (scale-norm, gate, proj, dropout)."""
    B, _, N, _ = x.shape
    x = attn.norm(x.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        x = x * gate
    return attn.proj_drop(attn.proj(x))


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
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = project_qkv(attn, x)
    bias = None if size is None else size_bias(size, q.dtype)
    out = _output(attn, _attend(attn, q, k, v, bias), gate)
    return out, k.mean(dim=1) if return_keys else None


def rotary_qkv(
    attn: nn.Module, x: torch.Tensor, rope: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k rotated, k and v repeated to every query head (grouped-query attention), and the keys
    before the rotation averaged over heads (B, T, head_dim), of timm's `EvaAttention` / `AttentionRope`.

    `rope`: (B, 1 or heads, T, D) sin/cos rows from `regtome.rope.rope_for_tokens`, the identity
    rotation for tokens without a position (class, registers); None for Eva models without RoPE.
    """
    q, k, v = project_rope_qkv(attn, x)
    keys = k.mean(dim=1)
    if rope is not None:
        half = getattr(attn, "rotate_half", False)
        q, k = rotate(q, rope, half).type_as(v), rotate(k, rope, half).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return q, k, v, keys


def rope_attention_with_keys(
    attn: nn.Module,
    x: torch.Tensor,
    rope: Optional[torch.Tensor],
    size: Optional[torch.Tensor] = None,
    return_keys: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """timm's Eva attention with one rotary embedding per token; returns the output and the keys.

    The result equals timm's, which leaves its first `num_prefix_tokens` tokens unrotated (they get
    the identity rotation here). The keys for matching are taken before the rotation: they compare
    content, not position.
    """
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v, keys = rotary_qkv(attn, x, rope)
    bias = None if size is None else size_bias(size, q.dtype)
    return _output(attn, _attend(attn, q, k, v, bias), gate), keys if return_keys else None


def call_observing_keys(
    module: nn.Module, k_norm: nn.Module, head_dim: int, *args: Any, **kwargs: Any
) -> tuple[Any, torch.Tensor]:
    """Call a timm module unchanged and return its output and the keys it computed, averaged over heads.

    The keys are read at the output of its `k_norm` (an `nn.Identity` when QK-norm is off), the last
    step before attention in every timm attention; `head_dim` is the axis of the heads there.
    """
    seen: list[torch.Tensor] = []
    handle = k_norm.register_forward_hook(lambda _module, _args, out: seen.append(out))
    try:
        out = module(*args, **kwargs)
    finally:
        handle.remove()
    return out, seen[0].mean(dim=head_dim)
