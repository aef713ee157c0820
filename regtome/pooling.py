"""Pooling over merged tokens: a merged token counts as the tokens it stands for.

Average pooling weighs each token by its size; attention pooling adds log(size) to the latent
query's logits (proportional attention). Which tokens are pooled is the protection mode's
`pooled_kinds` (`regtome.protection`): the patches (prefix, apart), or patches and registers (class:
registers may sit inside patch tokens, as in ToMe). Where registers merge but are not pooled
(apart), they no longer lead the sequence once tokens merged, so they are left out by their kind,
per image, not by position.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import size_bias
from .kinds import REGISTER
from .protection import protection
from .record import ForwardRecord


def kinds_scattered(record: ForwardRecord) -> bool:
    """True when the pooled tokens are not simply those after a leading run (apart, after a merge)."""
    mode = protection(record.protect)
    unpooled_registers_move = mode.merges_registers and REGISTER not in mode.pooled_kinds
    return unpooled_registers_move and record.layout.num_register > 0 and any(record.r)


def leading_unpooled(record: ForwardRecord) -> int:
    """While kinds are not scattered, the tokens a pool leaves out are the leading ones: how many."""
    return protection(record.protect).unpooled_lead(record.layout.num_class, record.layout.num_register)


def pooled(kind: torch.Tensor, protect: str) -> torch.Tensor:
    """(B, T) bool: the tokens a pool over 'the patches' takes under `protect`."""
    keep = torch.zeros_like(kind, dtype=torch.bool)
    for pooled_kind in sorted(protection(protect).pooled_kinds):
        keep = keep | (kind == pooled_kind)
    return keep


def size_weighted_pool(
    x: torch.Tensor, size: torch.Tensor, pool_type: str, keep: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """'avg', 'avgmax' or 'max' over tokens x (B, T, C) with sizes (B, T, 1); `keep` (B, T) leaves tokens out."""
    weights = size.to(x.dtype)
    if keep is not None:
        weights = weights * keep[..., None].to(x.dtype)
    mean = (x * weights).sum(dim=1) / weights.sum(dim=1)
    if pool_type == "avg":
        return mean
    peak = x if keep is None else x.masked_fill(~keep[..., None], float("-inf"))
    peak = peak.amax(dim=1)
    return peak if pool_type == "max" else 0.5 * (peak + mean)


def attention_pool_bias(
    record: ForwardRecord, dtype: torch.dtype, keep: Optional[torch.Tensor] = None
) -> Optional[torch.Tensor]:
    """Additive (B, 1, 1, T) logits bias for an attention pool: log(size) once tokens merged, -inf for tokens
    left out."""
    bias = size_bias(record.size, dtype) if any(record.r) else None
    if keep is not None:
        excluded = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, float("-inf"))
        excluded = excluded[:, None, None]
        bias = excluded if bias is None else bias + excluded
    return bias
