"""Analytic FLOPs of a timm ViT, merged or not, counted from the tokens each block really sees.

Counted as multiply-accumulates (the convention of fvcore and the ToMe paper): patch embedding,
QKV, attention logits and values, output projection, MLP and head. LayerNorms, softmax and the
matching itself are left out (under 1% for ViT-S).
"""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def block_token_counts(model: nn.Module, input_size: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """Run one image; return tokens entering attention and entering the MLP of every block."""
    attn_tokens: list[int] = []
    mlp_tokens: list[int] = []
    hooks = []
    for block in model.blocks:
        hooks.append(block.norm1.register_forward_hook(lambda m, i, o: attn_tokens.append(o.shape[1])))
        hooks.append(block.norm2.register_forward_hook(lambda m, i, o: mlp_tokens.append(o.shape[1])))
    param = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return attn_tokens, mlp_tokens


def vit_flops(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> float:
    """GFLOPs (multiply-accumulates) per image of `model` at its current r."""
    return token_flops(model, *block_token_counts(model, input_size), input_size)


def token_flops(model: nn.Module, attn_tokens: list[int], mlp_tokens: list[int],
                input_size: tuple[int, int, int]) -> float:
    """GFLOPs per image when block i attends over attn_tokens[i] tokens and its MLP sees mlp_tokens[i]."""
    dim = model.embed_dim
    patch = model.patch_embed.proj
    num_patches = (input_size[1] // patch.stride[0]) * (input_size[2] // patch.stride[1])
    flops = num_patches * patch.in_channels * patch.kernel_size[0] * patch.kernel_size[1] * dim
    for block, t_attn, t_mlp in zip(model.blocks, attn_tokens, mlp_tokens):
        attn_dim = block.attn.attn_dim
        flops += t_attn * dim * 3 * attn_dim  # qkv
        flops += 2 * t_attn * t_attn * attn_dim  # q @ k and attn @ v
        flops += t_attn * attn_dim * dim  # proj
        flops += t_mlp * sum(m.in_features * m.out_features for m in block.mlp.modules() if isinstance(m, nn.Linear))
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        flops += head.in_features * head.out_features
    return flops / 1e9
