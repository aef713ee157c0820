"""Analytic FLOPs of a timm ViT, merged or not, counted from the tokens each block sees.

Counted as multiply-accumulates (the convention of fvcore and the ToMe paper): patch embedding,
every linear layer of every block (QKV, output projection, MLP, gates) times the tokens it sees,
the attention logits and values, attention pooling, and the head. LayerNorms, softmax, rotary
embeddings and the matching itself are left out (under 1% for ViT-S).

Token counts come from `count_tokens`, which follows the patched forward (tested against the
model's own record): in sequential blocks the MLP sees the merged tokens; in parallel blocks
(`regtome.blocks.MERGES_AFTER_BLOCK`) the whole block sees the tokens it received.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch.nn as nn
from timm.layers.diff_attention import DiffAttention
from timm.models.vision_transformer import DiffParallelScalingBlock

from .blocks import MERGES_AFTER_BLOCK, block_attentions
from .layout import prefix_schedule
from .merge import capped_r
from .parts import current_options, model_parts
from .protection import protection
from .schedule import RSchedule, parse_r


def grid_tokens(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Patch tokens of an input of `input_size` (C, H, W)."""
    proj = model_parts(model).patch_conv
    return (input_size[1] // proj.stride[0]) * (input_size[2] // proj.stride[1])


class TokenCounts(NamedTuple):
    """What a forward pass at some r does to the token count, block by block (one image)."""

    attention: list[int]  # tokens entering each block's attention
    mlp: list[int]  # tokens each block's MLP sees
    after: list[int]  # tokens leaving each block (`ForwardRecord.tokens`)
    r: list[int]  # tokens merged in each block: the requested r, capped (`ForwardRecord.r`)
    r_requested: list[int]  # `ForwardRecord.r_requested`


def count_tokens(model: nn.Module, r: RSchedule, input_size: tuple[int, int, int]) -> TokenCounts:
    """The token counts of a forward at schedule r and the model's other options, without running it.

    Follows the patched forward through the same rule (`regtome.layout.prefix_schedule`, the cap of
    `regtome.merge.capped_r`): prefix groups join at class_layer / register_layer, the protected
    tokens never merge, and parallel blocks merge after the block. The tests hold it to the record of
    real forward passes.
    """
    parts, options = model_parts(model), current_options(model)
    depth = len(parts.blocks)
    layout = parts.layout
    prefixes = prefix_schedule(
        layout, protection(options["protect"]), options["class_layer"], options["register_layer"], depth
    )
    tokens = grid_tokens(model, input_size)
    counts = TokenCounts([], [], [], [], parse_r(depth, r))
    for block, r_i, prefix in zip(parts.blocks, counts.r_requested, prefixes):
        tokens += layout.num_class * prefix.class_enters + layout.num_register * prefix.registers_enter
        counts.attention.append(tokens)
        applied = capped_r(r_i, tokens, prefix.num_protected, prefix.num_register if prefix.apart else None)
        counts.mlp.append(tokens if isinstance(block, MERGES_AFTER_BLOCK) else tokens - applied)
        counts.r.append(applied)
        tokens -= applied
        counts.after.append(tokens)
    return counts


def token_counts(model: nn.Module, input_size: Optional[tuple[int, int, int]] = None) -> TokenCounts:
    """`count_tokens` at the model's own r (0 for an unpatched model) and its input size by default."""
    size = model_parts(model).input_size if input_size is None else input_size
    return count_tokens(model, current_options(model)["r"], size)


def simulate_tokens(model: nn.Module, r: RSchedule, input_size: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """Tokens entering attention and the MLP of each block at schedule r (see `count_tokens`)."""
    counts = count_tokens(model, r, input_size)
    return counts.attention, counts.mlp


def _linear_macs(module: nn.Module) -> int:
    """Multiply-accumulates per token of all linear layers in `module`."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _attention_matmul_macs(block: nn.Module, tokens: int) -> int:
    """q @ k^T and attn @ v over `tokens` tokens (differential attention: two softmaxes over half-width keys)."""
    macs = 0
    for attn in block_attentions(block):
        diff = isinstance(attn, (DiffAttention, DiffParallelScalingBlock))
        heads = getattr(attn, "num_heads", None) or attn.num_attention_heads
        width = heads * attn.head_dim * (2 if diff else 1)  # query channels
        macs += (3 if diff else 2) * tokens * tokens * width
    return macs


def block_macs(block: nn.Module, attn_tokens: int, mlp_tokens: int) -> int:
    """Multiply-accumulates of one block whose attention sees `attn_tokens` and MLP `mlp_tokens` tokens."""
    mlps = list(block.ffns) if hasattr(block, "ffns") else [getattr(block, "mlp", None)]
    mlp = sum(_linear_macs(m) for m in mlps if m is not None)
    return (_linear_macs(block) - mlp) * attn_tokens + mlp * mlp_tokens + _attention_matmul_macs(block, attn_tokens)


def token_flops(
    model: nn.Module, attn_tokens: list[int], mlp_tokens: list[int], input_size: tuple[int, int, int]
) -> float:
    """GFLOPs per image when block i attends over attn_tokens[i] tokens and its MLP sees mlp_tokens[i]."""
    parts = model_parts(model)
    patch = parts.patch_conv
    flops = (
        grid_tokens(model, input_size)
        * patch.in_channels
        * patch.kernel_size[0]
        * patch.kernel_size[1]
        * patch.out_channels
    )
    for block, t_attn, t_mlp in zip(parts.blocks, attn_tokens, mlp_tokens):
        flops += block_macs(block, t_attn, t_mlp)
    pool = getattr(model, "attn_pool", None)  # timm's attention pool (a transformers head is not counted)
    if pool is not None:  # latent queries over the final tokens: keys/values of every token, the rest per query
        final, queries = mlp_tokens[-1], pool.latent_len
        flops += _linear_macs(pool.kv) * final + (_linear_macs(pool) - _linear_macs(pool.kv)) * queries
        flops += 2 * queries * final * pool.num_heads * pool.head_dim
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        flops += head.in_features * head.out_features
    return flops / 1e9


def vit_flops(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> float:
    """GFLOPs (multiply-accumulates) per image of `model` at its current r (0 for an unpatched model)."""
    return token_flops(model, *simulate_tokens(model, current_options(model)["r"], input_size), input_size)
