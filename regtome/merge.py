"""A block's merge, top to bottom: `merge_tokens` (what a block calls between attention and MLP) asks
`bipartite_soft_matching` (ToMe's, leaving the first `num_protected` tokens alone) for the r best pairs,
at most `capped_r` of them, and merges sizes, kinds, positions, sources and owners alike.

The token layout is ``[protected | mergeable]``. The protected tokens (class, distillation and,
under protect="prefix", register tokens) are never merged and nothing is merged into them: they
keep their positions. After a merge the layout is ``[protected | unmerged A tokens | B tokens]``.

With `kind` (protect="apart"), a token may merge only with a token of its own kind: edges between
kinds get a similarity of -inf, and the cap (`capped_r`, below) leaves enough same-kind
pairs in every image, so the r best pairs are all same-kind.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from .layout import BlockPrefix
from .tokens import Tokens

MergeFn = Callable[..., torch.Tensor]


def merge_tokens(tokens: Tokens, keys: Optional[torch.Tensor], r: int, prefix: BlockPrefix) -> Tokens:
    """Merge the r most similar mergeable tokens (by `keys`) under the block's prefix rule.

    Sizes add up, kinds and positions are those of the destination token (a merge never mixes
    kinds under protect="apart"), sources add up, owners follow their token."""
    if r <= 0 or keys is None:
        return tokens
    merge, unmerge = bipartite_soft_matching(
        keys, r, prefix.num_protected, kind=tokens.kind if prefix.apart else None, num_registers=prefix.num_register
    )
    x, size = merge_wavg(merge, tokens.x, tokens.size)
    kind = merge(tokens.kind[..., None], mode="keep")[..., 0]
    position = None if tokens.position is None else merge(tokens.position[..., None], mode="keep")[..., 0]
    owner = None
    if tokens.owner is not None:
        batch, new_count = x.shape[:2]
        went_to = unmerge(torch.arange(new_count, device=x.device)[None, :, None].expand(batch, -1, 1))[..., 0]
        went_to = torch.cat([went_to, went_to.new_full((batch, 1), new_count)], dim=1)  # the not-entered slot
        owner = went_to.gather(1, tokens.owner)
    return Tokens(x, size, kind, merge_source(merge, tokens.source), position, owner)


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
            keeps every merge within a kind; see `capped_r`, below).

    The mergeable tokens alternate between sets A (even) and B (odd). Each A token picks its most
    similar B token by cosine similarity; the r A tokens with the highest such similarity merge.
    """
    num_tokens = metric.shape[1]
    r = capped_r(r, num_tokens, num_protected, num_registers if kind is not None else None)
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        batch, device = metric.shape[0], metric.device
        metric = metric[:, num_protected:].float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)  # set A (even) against set B (odd)
        if kind is not None:
            kind = kind[:, num_protected:]
            scores = scores.masked_fill(kind[:, ::2, None] != kind[:, None, 1::2], float("-inf"))
        node_max, node_idx = scores.max(dim=-1)
        # Every A token in order of its best similarity: the r first merge; the others keep this order, which
        # decides the next block's A/B split, so the whole order is needed (a top-r selection would not do).
        edge_idx = node_max.argsort(dim=-1, descending=True)
        dst_idx = node_idx.gather(dim=1, index=edge_idx[:, :r])  # B partners of the r merging A tokens

        # Row indices into x flattened to (batch * tokens, C): one index_select and one index_add_ per
        # merge are several times faster than gather/scatter on (B, T, C). Every index is a slot of the
        # sequence plus its image's offset; computed once here, shared by every merge of the block.
        num_a, out_tokens = scores.shape[1], num_tokens - r
        image = torch.arange(batch, device=device)[:, None]
        slots = torch.arange(num_tokens, device=device)
        a_slots = 2 * edge_idx + num_protected
        kept = torch.cat(
            [slots[:num_protected].expand(batch, -1), a_slots[:, r:], slots[num_protected + 1 :: 2].expand(batch, -1)],
            dim=1,
        )
        in_offset = image * num_tokens
        keep_rows = (kept + in_offset).flatten()
        src_rows = (a_slots[:, :r] + in_offset).flatten()
        dst_rows = (dst_idx + (image * out_tokens + (num_protected + num_a - r))).flatten()

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


def capped_r(r: int, num_tokens: int, num_protected: int, apart_registers: Optional[int] = None) -> int:
    """The most tokens one block can merge: r, capped so that every merge is a legal one.

    Set A holds ceil(m/2) of the m mergeable tokens and set B the rest; at most m // 2 merge.
    With ``apart_registers=R`` (protect="apart": at most R of the mergeable tokens are registers,
    which merge only with registers) the cap is ``min(m // 2, ceil(m/2) - R)`` while
    ``m // 2 > R``, else 0. Why that is safe at any r: at least m - R tokens are patches; at most
    m // 2 of them sit in B, so at least ceil(m/2) - R patches sit in A, and at least m // 2 - R >= 1
    patches sit in B, so each of those A patches has a patch to merge with. Registers merging with
    registers only add to that. The matching takes its r best same-kind pairs, never another pair.
    """
    mergeable = num_tokens - num_protected
    cap = mergeable // 2
    if apart_registers:
        cap = min(cap, (mergeable + 1) // 2 - apart_registers) if mergeable // 2 > apart_registers else 0
    return max(0, min(r, cap))


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
