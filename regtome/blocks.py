"""One timm block with a merge inside it, for each block family RegToMe supports.

Where the merge happens:
- Sequential blocks (attention, then MLP: timm's `Block`, `ResPostBlock`, `ParallelThingsBlock`,
  Eva's `EvaBlock`, `EvaBlockPostNorm`): between the attention and the MLP, as in ToMe, with the
  attention's keys as the metric. The MLP already sees the merged tokens.
- Parallel blocks (`ParallelScalingBlock`, `DiffParallelScalingBlock`: attention and MLP read the same
  input and are added together): after the block, with the block's keys as the metric; there is
  no point in between. The merge saves nothing in the block that decides it, all of it later.

Proportional attention is a log(size) bias on the logits: through RegToMe's mirrors of timm's
attention (`regtome.attention`) for `Attention` and Eva's rotary attention, and through timm's own
`attn_mask` argument for the others.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.eva import EvaBlock, EvaBlockPostNorm
from timm.models.vision_transformer import (
    Block,
    DiffParallelScalingBlock,
    ParallelScalingBlock,
    ParallelThingsBlock,
    ResPostBlock,
)

from .attention import attention_with_keys, call_observing_keys, rope_attention_with_keys, size_bias
from .forward import BlockForward
from .layout import BlockPrefix
from .merge import merge_tokens
from .rope import rope_for_tokens
from .tokens import Tokens


def _bias(tokens: Tokens, prop_attn: bool) -> Optional[torch.Tensor]:
    return size_bias(tokens.size, tokens.x.dtype) if prop_attn else None


def _attention(
    attn: nn.Module, x: torch.Tensor, tokens: Tokens, prop_attn: bool, want_keys: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Any timm self-attention module of a sequential block: output and keys (B, T, head_dim)."""
    size = tokens.size if prop_attn else None
    if type(attn) is Attention:
        return attention_with_keys(attn, x, size, return_keys=want_keys)
    # e.g. DiffAttention: timm's own forward, keys read at its k_norm ((B, heads, T, head_dim))
    return call_observing_keys(attn, attn.k_norm, 1, x, attn_mask=_bias(tokens, prop_attn))


def block_forward(
    block: Block, tokens: Tokens, r: int, prefix: BlockPrefix, prop_attn: bool, rope: Optional[torch.Tensor] = None
) -> Tokens:
    attn_out, keys = _attention(block.attn, block.norm1(tokens.x), tokens, prop_attn, r > 0)
    tokens = tokens._replace(x=tokens.x + block.drop_path1(block.ls1(attn_out)))
    tokens = merge_tokens(tokens, keys, r, prefix)
    return tokens._replace(x=tokens.x + block.drop_path2(block.ls2(block.mlp(block.norm2(tokens.x)))))


def res_post_block_forward(
    block: ResPostBlock,
    tokens: Tokens,
    r: int,
    prefix: BlockPrefix,
    prop_attn: bool,
    rope: Optional[torch.Tensor] = None,
) -> Tokens:
    attn_out, keys = _attention(block.attn, tokens.x, tokens, prop_attn, r > 0)
    tokens = tokens._replace(x=tokens.x + block.drop_path1(block.norm1(attn_out)))
    tokens = merge_tokens(tokens, keys, r, prefix)
    return tokens._replace(x=tokens.x + block.drop_path2(block.norm2(block.mlp(tokens.x))))


def parallel_things_block_forward(
    block: ParallelThingsBlock,
    tokens: Tokens,
    r: int,
    prefix: BlockPrefix,
    prop_attn: bool,
    rope: Optional[torch.Tensor] = None,
) -> Tokens:
    """Parallel attentions, then parallel MLPs; the metric is the keys averaged over the attentions."""
    outputs = [_attention(branch.attn, branch.norm(tokens.x), tokens, prop_attn, r > 0) for branch in block.attns]
    update = torch.stack([branch.drop_path(branch.ls(out)) for branch, (out, _) in zip(block.attns, outputs)])
    tokens = tokens._replace(x=tokens.x + update.sum(dim=0))
    keys = torch.stack([k for _, k in outputs]).mean(dim=0) if r > 0 else None
    tokens = merge_tokens(tokens, keys, r, prefix)
    return tokens._replace(x=tokens.x + torch.stack([ffn(tokens.x) for ffn in block.ffns]).sum(dim=0))


def parallel_scaling_block_forward(
    block: nn.Module, tokens: Tokens, r: int, prefix: BlockPrefix, prop_attn: bool, rope: Optional[torch.Tensor] = None
) -> Tokens:
    """timm's fused parallel block as it is, then the merge (keys read inside it)."""
    # ParallelScalingBlock applies k_norm to (B, T, heads, head_dim), the differential one to (B, heads, T, d).
    head_dim = 2 if isinstance(block, ParallelScalingBlock) else 1
    x, keys = call_observing_keys(block, block.k_norm, head_dim, tokens.x, attn_mask=_bias(tokens, prop_attn))
    return merge_tokens(tokens._replace(x=x), keys, r, prefix)


def eva_block_forward(
    block: EvaBlock, tokens: Tokens, r: int, prefix: BlockPrefix, prop_attn: bool, rope: Optional[torch.Tensor] = None
) -> Tokens:
    """`rope`: the block's rotary table (`regtome.rope.rope_table`), None for Eva models without RoPE."""
    post_norm = isinstance(block, EvaBlockPostNorm)
    rope_rows = None if rope is None else rope_for_tokens(rope, tokens.position)
    attn_in = tokens.x if post_norm else block.norm1(tokens.x)
    attn_out, keys = rope_attention_with_keys(
        block.attn, attn_in, rope_rows, tokens.size if prop_attn else None, return_keys=r > 0
    )
    if post_norm:
        attn_out = block.norm1(attn_out)
    elif block.gamma_1 is not None:
        attn_out = block.gamma_1 * attn_out
    tokens = tokens._replace(x=tokens.x + block.drop_path1(attn_out))
    tokens = merge_tokens(tokens, keys, r, prefix)
    if post_norm:
        return tokens._replace(x=tokens.x + block.drop_path2(block.norm2(block.mlp(tokens.x))))
    mlp_out = block.mlp(block.norm2(tokens.x))
    if block.gamma_2 is not None:
        mlp_out = block.gamma_2 * mlp_out
    return tokens._replace(x=tokens.x + block.drop_path2(mlp_out))


# Every forward: (block, tokens, r, prefix, prop_attn, rope) -> tokens; rope is used by Eva blocks only.
BLOCK_FORWARDS: dict[type, BlockForward] = {
    Block: block_forward,
    ResPostBlock: res_post_block_forward,
    ParallelThingsBlock: parallel_things_block_forward,
    ParallelScalingBlock: parallel_scaling_block_forward,
    DiffParallelScalingBlock: parallel_scaling_block_forward,
    EvaBlock: eva_block_forward,
    EvaBlockPostNorm: eva_block_forward,
}
MERGES_AFTER_BLOCK = (ParallelScalingBlock, DiffParallelScalingBlock)


def block_attentions(block: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a block: timm's `attn` (or one per parallel branch), transformers'
    `attention` / `self_attn`; a fused parallel block is its own attention."""
    if hasattr(block, "attns"):
        return [branch.attn for branch in block.attns]
    return [next((getattr(block, n) for n in ("attn", "attention", "self_attn") if hasattr(block, n)), block)]


def merging_block_forward(
    block: nn.Module, tokens: Tokens, r: int, prefix: BlockPrefix, prop_attn: bool, rope: Optional[torch.Tensor] = None
) -> Tokens:
    """Run `block` on `tokens` with up to r merges (`rope`: the rotary table of Eva models, else None).

    The caller passes prop_attn=False while every size is still 1, so that attention then runs
    through timm's exact (fused) call."""
    return BLOCK_FORWARDS[type(block)](block, tokens, r, prefix, prop_attn, rope)
