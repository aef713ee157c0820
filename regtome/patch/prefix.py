"""What the prefix tokens (class, distillation, registers / storage tokens) attend to."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.eva import EvaBlock
from timm.models.vision_transformer import Block

from ..attention import attention_logits, project_qkv, rotary_qkv, size_bias
from ..layout import prefix_names
from ..parts import require_patched
from ..rope import initial_positions, rope_for_tokens
from ..tokens import slot_owner
from .api import check_block, options, trace


def _queries_and_keys(
    model: nn.Module, block: int, x: torch.Tensor, images: torch.Tensor, positions: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, heads, T, head_dim) queries and keys that block `block` computes from its attention input `x`
    (`positions`: each token's rotary table row, 0 for the prefix; RoPE models carry them)."""
    attn = model.regtome_blocks()[block].attn
    if type(attn) is Attention:
        q, k, _ = project_qkv(attn, x)
        return q, k
    ropes = model.regtome_embed(images, block + 1).ropes
    rope = None if ropes is None or positions is None else rope_for_tokens(ropes[block], positions)
    q, k, _, _ = rotary_qkv(attn, x, rope)
    return q, k


def prefix_attention_support(model: nn.Module, block: int) -> Optional[str]:
    """None when `prefix_attention` reads block `block` of the patched `model`; else why it does not (the
    message of the TypeError it raises). Ask before calling it, rather than catching every TypeError."""
    require_patched(model, "regtome.prefix_attention_support")
    block = check_block(model, block, "block")
    target = model.regtome_blocks()[block]
    attn = getattr(target, "attn", None)
    if type(target) not in (Block, EvaBlock) or type(attn) is not Attention and not hasattr(attn, "rotate_half"):
        return (
            f"prefix_attention supports pre-norm blocks with timm's Attention or Eva's rotary attention, "
            f"not {type(target).__name__} with {type(attn).__name__}"
        )
    return None


def _check_block(model: nn.Module, block: int) -> int:
    require_patched(model, "regtome.prefix_attention")
    block = check_block(model, block, "block")
    unsupported = prefix_attention_support(model, block)
    if unsupported:
        raise TypeError(unsupported)
    return block


@torch.no_grad()
def prefix_attention(
    model: nn.Module, images: torch.Tensor, block: int, merged: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """What each prefix token (class, distillation, registers) attends to among the patches at `block`.

    Returns the softmax attention of the P prefix tokens present at `block` over the N patches,
    (B, heads, P, N), and their names (``"class"``, ``"distill"``, ``"register 1"``, ...). DINOv3's
    storage tokens are its registers. Pre-norm blocks with timm's `Attention` or Eva's rotary attention.

    merged=False: the model runs without merging (r=0), so every patch keeps its own key.
    merged=True: the model runs as it is set (r, protect), and each prefix token's row is the
    attention of the token that holds it at `block`, with proportional attention as the model
    applies it; a merged token's weight is spread evenly over its patches. Registers merged
    together (protect="apart") share one row, and their name joins their numbers, as for the first
    image (``"registers 1+3"``): call it with one image to read the grouping.
    """
    block = _check_block(model, block)
    target = model.regtome_blocks()[block]
    if merged and block > 0:
        return _merged_prefix_attention(model, images, block)
    captured: dict[str, torch.Tensor] = {}
    # The attention's input is norm1's output (RegToMe calls the attention's layers, not attn itself).
    hook = target.norm1.register_forward_hook(lambda m, args, out: captured.setdefault("x", out))
    try:
        with options(model, r=0):
            model(images)
    finally:
        hook.remove()
    names = _names(model, block)
    x = captured["x"]
    positions = initial_positions(x.shape[0], len(names), x.shape[1] - len(names), x.device)
    q, k = _queries_and_keys(model, block, x, images, positions)
    weights = attention_logits(q, k, target.attn.scale).float().softmax(dim=-1)
    return weights[:, :, : len(names), len(names) :], names


def _merged_prefix_attention(model: nn.Module, images: torch.Tensor, block: int) -> tuple[torch.Tensor, list[str]]:
    target = model.regtome_blocks()[block]
    record = trace(model, images, [block - 1])
    state = record.blocks[block - 1]  # the tokens entering `block`
    names = _names(model, block)
    p = len(names)
    q, k = _queries_and_keys(model, block, target.norm1(state.x), images, state.position)
    logits = attention_logits(q, k, target.attn.scale).float()
    if model.prop_attn and any(record.r):  # proportional attention, as the model applies it
        logits = logits + size_bias(state.size, logits.dtype)
    weights = logits.softmax(dim=-1)  # (B, heads, T, T)
    assert state.source is not None  # regtome.trace traces sources
    holder = slot_owner(state.source)  # (B, N): the token holding each slot of the full sequence
    full = model.regtome_layout().num_prefix
    prefix_holders = holder[:, full - p : full]  # the prefix slots present at `block`
    rows = weights.gather(2, prefix_holders[:, None, :, None].expand(-1, weights.shape[1], -1, weights.shape[-1]))
    patch_holders = holder[:, full:]  # (B, N_patches)
    per_patch = rows / state.size[:, None, None, :, 0]  # a token's weight spread over its patches
    out = per_patch.gather(3, patch_holders[:, None, None, :].expand(-1, rows.shape[1], p, -1))
    return out, _joined_names(names, prefix_holders[0].tolist())


def _joined_names(names: list[str], holders: list[int]) -> list[str]:
    """'registers 1+3' for register slots held by the same token; other names as they are."""
    out = []
    for name, holder in zip(names, holders):
        group = [n for n, h in zip(names, holders) if h == holder]
        if len(group) > 1:
            name = "registers " + "+".join(n.split()[-1] for n in group)
        out.append(name)
    return out


def _names(model: nn.Module, block: int) -> list[str]:
    return prefix_names(model.regtome_layout(), model.class_layer, model.register_layer, block)
