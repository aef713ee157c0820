"""Rotary position embeddings (RoPE) for merged tokens: the table, the row of each token, the rotation.

timm's Eva models (DINOv3, EVA-02, the `vit_*_rope_*` family) and transformers' DINOv3 rotate the
queries and keys of each patch by an angle set by its grid position, and leave class and register
tokens unrotated. Once tokens merge, each output token needs one position. Two rules were weighed:

- **destination** (the rule used): a merged token keeps the position of the token it was merged into
  (set B of the bipartite matching). Every timm RoPE flavour ('cat', 'dinov3', 'mixed' with its
  per-block tables; 'mrope' too, though no timm config uses it) and transformers' DINOv3 hand over
  sin/cos rows, one per grid position, so the rule is a row lookup: exact for unmerged tokens, the
  same for every flavour, no frequency code repeated here, and every angle is one the model was
  trained with. ToMe merges tokens that are alike, and those are mostly neighbours, so the position
  it keeps is near the others it stands for.
- **size-weighted centroid**: rotate at the mean grid coordinate of a token's patches. It needs each
  flavour's frequencies and coordinate scaling re-implemented to evaluate fractional positions, and
  for merges of distant look-alikes (sky on both sides of an object) it invents a position between
  them that none of its patches has. Not offered.

The table (`rope_table`) holds timm's 'cat' layout, sin and cos concatenated on the last axis, with
row 0 the identity rotation (sin 0, cos 1) for tokens without a position and rows 1..N the patches:
a token's position is an int, carried through merges with ``merge(..., mode="keep")``.
`rope_for_tokens` looks the rows up; `rotate` applies them (timm's interleaved or half rotation).
"""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat

NO_POSITION = 0  # table row of the identity rotation: class, distillation and register tokens


def rope_table(sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """(..., N, D) sin and cos rows of the grid -> the (..., 1 + N, 2D) table, row 0 the identity."""
    identity = torch.cat([torch.zeros_like(sin[..., :1, :]), torch.ones_like(cos[..., :1, :])], dim=-1)
    return torch.cat([identity, torch.cat([sin, cos], dim=-1)], dim=-2)


def timm_rope_table(rope: torch.Tensor) -> torch.Tensor:
    """timm's (..., N, 2D) rotary rows (sin and cos concatenated, the 'cat' layout) as a `rope_table`."""
    sin, cos = rope.tensor_split(2, dim=-1)
    return rope_table(sin, cos)


def initial_positions(batch: int, num_prefix: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """(B, num_prefix + num_patches) table rows of the model's sequence: prefix tokens 0, patch j row j + 1."""
    rows = torch.cat(
        [torch.full((num_prefix,), NO_POSITION, dtype=torch.long), torch.arange(1, num_patches + 1, dtype=torch.long)]
    )
    return rows.to(device)[None].expand(batch, -1)


def rope_for_tokens(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rotary rows of each token: table (..., 1 + N, D), positions (B, T) -> (B, 1 or ..., T, D).

    The result broadcasts against queries and keys of shape (B, heads, T, head_dim)."""
    batch, tokens = positions.shape
    lead = table.shape[:-2]
    rows = table.index_select(-2, positions.reshape(-1)).reshape(*lead, batch, tokens, table.shape[-1])
    return rows[:, None] if not lead else rows.movedim(-3, 0)


def rotate(x: torch.Tensor, rows: torch.Tensor, half: bool) -> torch.Tensor:
    """Rotate queries or keys x (B, heads, T, head_dim) by their rows from `rope_for_tokens`: pairs of
    neighbouring channels (timm's default), or the two halves of the head (``half``: DINOv3, transformers)."""
    return apply_rot_embed_cat(x, rows, half=half)
