"""Bipartite soft matching (ToMe) that leaves the first `num_protected` tokens alone.

The token layout is ``[protected | mergeable]``. The protected tokens (class, distillation and,
under protect="prefix", register tokens) are never merged and nothing is merged into them: they
keep their positions. After a merge the layout is ``[protected | unmerged A tokens | B tokens]``.

With `kind` (protect="apart"), a token may merge only with a token of its own kind: edges between
kinds get a similarity of -inf, and the cap (`regtome.schedule.capped_r`) leaves enough same-kind
pairs in every image, so the r best pairs are all same-kind.
"""

from __future__ import annotations

import warnings
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
    kind: Optional[torch.Tensor] = None,
    num_registers: int = 0,
) -> tuple[MergeFn, MergeFn]:
    """Match the r most similar tokens of set A to set B and return ``(merge, unmerge)``.

    Args:
        metric: (B, T, C) features to compare, usually the attention keys averaged over heads.
        r: how many tokens to remove; capped at half of the mergeable tokens.
        num_protected: the first `num_protected` tokens are never merged.
        kind: optional (B, T) token kinds (`regtome.layout`): tokens merge only within their kind.
        num_registers: with `kind`, at most how many mergeable tokens are not patches (the cap
            keeps every merge within a kind; see `regtome.schedule.capped_r`).

    The mergeable tokens alternate between sets A (even) and B (odd). Each A token picks its most
    similar B token by cosine similarity; the r A tokens with the highest such similarity merge.
    """
    num_tokens = metric.shape[1]
    r = capped_r(r, num_tokens, num_protected, num_registers if kind is not None else None)
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        batch = metric.shape[0]
        metric = metric[:, num_protected:].float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)
        if kind is not None:
            kind = kind[:, num_protected:]
            scores = scores.masked_fill(kind[:, ::2, None] != kind[:, None, 1::2], float("-inf"))
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)  # A tokens, most similar first
        dst_idx = node_idx.gather(dim=1, index=edge_idx[:, :r])  # B partners of the r merging A tokens

        # Row indices into x flattened to (batch * tokens, C): one index_select and one
        # index_add_ per merge are several times faster than gather/scatter on (B, T, C).
        device, num_a, num_b = metric.device, a.shape[1], b.shape[1]
        out_tokens = num_tokens - r
        in_offset = torch.arange(batch, device=device)[:, None] * num_tokens
        out_offset = torch.arange(batch, device=device)[:, None] * out_tokens
        a_rows = num_protected + 2 * edge_idx + in_offset
        b_rows = num_protected + 1 + 2 * torch.arange(num_b, device=device) + in_offset
        protected_rows = torch.arange(num_protected, device=device) + in_offset
        keep_rows = torch.cat([protected_rows, a_rows[:, r:], b_rows], dim=1).flatten()
        src_rows = a_rows[:, :r].flatten()
        dst_rows = (num_protected + num_a - r + dst_idx + out_offset).flatten()

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """(B, T, C) -> (B, T - r, C); mode is how a B token combines with its A tokens: sum, mean, amax,
        or keep (the B token's own value, e.g. its position)."""
        channels = x.shape[-1]
        flat = x.reshape(-1, channels)
        out = flat.index_select(0, keep_rows)
        if mode == "keep":
            return out.view(batch, out_tokens, channels)
        src = flat.index_select(0, src_rows)
        if mode == "sum":
            out.index_add_(0, dst_rows, src)
        else:
            with warnings.catch_warnings():  # index_reduce_ is marked beta in torch
                warnings.simplefilter("ignore", UserWarning)
                out.index_reduce_(0, dst_rows, src, mode)
        return out.view(batch, out_tokens, channels)

    def unmerge(x: torch.Tensor) -> torch.Tensor:
        """(B, T - r, C) -> (B, T, C): every input token gets the value of the token it went into.

        Works on any dtype: unmerging the output indices (an arange) gives where each input token went."""
        channels = x.shape[-1]
        flat = x.reshape(-1, channels)
        out = flat.new_empty(batch * num_tokens, channels)
        out.index_copy_(0, keep_rows, flat)
        out.index_copy_(0, src_rows, flat.index_select(0, dst_rows))
        return out.view(batch, num_tokens, channels)

    return merge, unmerge


def merge_wavg(merge: MergeFn, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge tokens by their size-weighted average; returns the new tokens and their (fp32) sizes."""
    weighted = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return (weighted / size).to(x.dtype), size


def merge_source(merge: MergeFn, source: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Track which input tokens each token is made of: a (B, T, N) 0/1 matrix.

    Every input token is in exactly one row, so merged rows are disjoint and their sum is their union.
    """
    return None if source is None else merge(source, mode="sum")
