"""Bipartite soft matching (ToMe) that leaves the first `num_protected` tokens alone.

The token layout is ``[protected | mergeable]``. The protected tokens (class, distillation and
register tokens) are never merged and nothing is merged into them: they keep their positions.
After a merge the layout is ``[protected | unmerged A tokens | B tokens]``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .schedule import capped_r

MergeFn = Callable[..., torch.Tensor]


def _identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    return x


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    num_protected: int = 0,
) -> tuple[MergeFn, MergeFn]:
    """Match the r most similar tokens of set A to set B and return ``(merge, unmerge)``.

    Args:
        metric: (B, T, C) features to compare, usually the attention keys averaged over heads.
        r: how many tokens to remove; capped at half of the mergeable tokens.
        num_protected: the first `num_protected` tokens are never merged.

    The mergeable tokens alternate between sets A (even) and B (odd). Each A token picks its most
    similar B token by cosine similarity; the r A tokens with the highest such similarity merge.
    """
    num_tokens = metric.shape[1]
    r = capped_r(r, num_tokens, num_protected)
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        metric = metric[:, num_protected:].float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[:, r:]  # A tokens that stay
        src_idx = edge_idx[:, :r]  # A tokens that merge
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)  # their B partners

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        protected, mergeable = x[:, :num_protected], x[:, num_protected:]
        src, dst = mergeable[:, ::2], mergeable[:, 1::2]
        n, t1, c = src.shape
        unm = src.gather(dim=1, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=1, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([protected, unm, dst], dim=1)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        """Undo `merge` for (B, T - r, C) tokens: each merged A token gets its B partner's value."""
        unm_len = unm_idx.shape[1]
        protected = x[:, :num_protected]
        unm, dst = x[:, num_protected:num_protected + unm_len], x[:, num_protected + unm_len:]
        n, _, c = unm.shape
        src = dst.gather(dim=1, index=dst_idx.expand(n, r, c))
        mergeable = x.new_zeros(n, num_tokens - num_protected, c)
        mergeable[:, 1::2] = dst
        a_positions = 2 * torch.cat([unm_idx, src_idx], dim=1)
        mergeable.scatter_(1, a_positions.expand(n, -1, c), torch.cat([unm, src], dim=1))
        return torch.cat([protected, mergeable], dim=1)

    return merge, unmerge


def merge_wavg(merge: MergeFn, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens by their size-weighted average; returns the new tokens and their (fp32) sizes."""
    weighted = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return (weighted / size).to(x.dtype), size


def merge_source(merge: MergeFn, source: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Track which input tokens each token is made of: a (B, T, N) 0/1 matrix."""
    return None if source is None else merge(source, mode="amax")
