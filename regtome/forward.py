"""The merging forward shared by every patched model: run the blocks, merge inside each, record it.

The patched model (`regtome.patch.base.PatchedModel`) embeds the image into the model's full sequence
``[class tokens | registers | patches]`` and hands over its blocks and a per-block forward
(`regtome.blocks`, `regtome.hf_blocks`). Prefix groups join at the block `regtome.layout.prefix_schedule`
says; per-pass state (sizes, kinds, sources, positions, owners) travels in `regtome.tokens.Tokens`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .kinds import CLASS, REGISTER
from .layout import BlockPrefix, PrefixLayout
from .protection import Protection
from .record import BlockTrace, ForwardRecord
from .tokens import Tokens, insert_prefix, patch_tokens

# (block, tokens, r, prefix rule, proportional attention on, rotary table or None) -> tokens
BlockForward = Callable[[nn.Module, Tokens, int, BlockPrefix, bool, Optional[torch.Tensor]], Tokens]


def run_blocks(
    x: torch.Tensor,
    *,
    blocks: Sequence[nn.Module],
    block_forward: BlockForward,
    prefixes: Sequence[BlockPrefix],
    r_per_block: Sequence[int],
    layout: PrefixLayout,
    protection: Protection,
    prop_attn: bool,
    trace_source: bool = False,
    ropes: Optional[Sequence[Optional[torch.Tensor]]] = None,
    keep: frozenset[int] = frozenset(),
    track_owner: bool = False,
    grad_checkpointing: bool = False,
) -> tuple[Tokens, ForwardRecord, dict[int, Tokens]]:
    """Run `blocks` on the embedded sequence x (B, N, C) with up to r_per_block[i] merges in block i.

    Returns the final tokens, the record of the pass, and the tokens after each block in `keep`.
    Proportional attention starts after the first merge: until then every size is 1, and attention
    runs through the model's exact call.
    """
    nc, p = layout.num_class, layout.num_prefix
    class_tokens, register_tokens = x[:, :nc], x[:, nc:p]
    tokens = patch_tokens(x, p, trace_source, with_positions=ropes is not None, track_owner=track_owner)
    merged_any, counts, applied, registers_left, kept = False, [], [], [], {}
    for i, block in enumerate(blocks):
        prefix = prefixes[i]
        if prefix.class_enters:
            tokens = insert_prefix(tokens, class_tokens, CLASS, first_slot=0, at=0)
        if prefix.registers_enter:
            tokens = insert_prefix(tokens, register_tokens, REGISTER, first_slot=nc, at=prefix.num_class)
        before = tokens.x.shape[1]
        args = (block, tokens, r_per_block[i], prefix, prop_attn and merged_any, None if ropes is None else ropes[i])
        if grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint(block_forward, *args, use_reentrant=False)
        else:
            tokens = block_forward(*args)
        merged_any = merged_any or tokens.x.shape[1] < before
        counts.append(tokens.x.shape[1])
        applied.append(before - tokens.x.shape[1])
        if not protection.registers_reach_patches:
            registers_left.append((tokens.kind == REGISTER).sum(dim=1))
        if i in keep:
            kept[i] = tokens
    record = ForwardRecord(
        size=tokens.size,
        source=tokens.source,
        kind=tokens.kind,
        tokens=tuple(counts),
        r=tuple(applied),
        r_requested=tuple(r_per_block[: len(counts)]),
        register_tokens=torch.stack(registers_left, dim=1) if registers_left else None,
        layout=layout,
        protect=protection.name,
        num_protected=prefixes[len(counts) - 1].num_protected,
        blocks={i: BlockTrace(t.x, t.size, t.kind, t.source, t.position, t.owner) for i, t in kept.items()},
        owner=tokens.owner,
    )
    return tokens, record, kept
