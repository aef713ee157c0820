"""The sequence between blocks and what travels with it through the merges.

Every token carries its size (how many of the model's tokens it stands for), its kind (patch,
register, class; see `regtome.layout`), and optionally its source (which of the model's N tokens
it holds, for visualisation), its rotary position (RoPE models) and, for every slot of the model's
full sequence, which current token holds it (`owner`: what puts merged features back on the grid).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .rope import NO_POSITION, initial_positions


class Tokens(NamedTuple):
    """x: (B, T, C). size: (B, T, 1) fp32. kind: (B, T) long. source: (B, T, N) 0/1 or None.
    position: (B, T) rotary table rows or None. owner: (B, N) long or None; a slot whose token has
    not entered the network yet (class_layer/register_layer) holds T, one past the last token."""

    x: torch.Tensor
    size: torch.Tensor
    kind: torch.Tensor
    source: Optional[torch.Tensor] = None
    position: Optional[torch.Tensor] = None
    owner: Optional[torch.Tensor] = None


def patch_tokens(
    x: torch.Tensor, num_prefix: int, trace_source: bool, with_positions: bool, track_owner: bool
) -> Tokens:
    """The patches of timm's full sequence x = [prefix | patches] as the first Tokens; the prefix
    joins later through `insert_prefix`. Sources index the full sequence, so a prefix token's row is
    one-hot on its own slot whenever it enters. Sizes are fp32 under autocast."""
    batch, num_tokens = x.shape[:2]
    patches = x[:, num_prefix:]
    count = num_tokens - num_prefix
    device = x.device
    source = None
    if trace_source:
        source = torch.eye(num_tokens, device=device, dtype=x.dtype)[num_prefix:][None].expand(batch, -1, -1)
    owner = None
    if track_owner:
        slots = torch.cat([torch.full((num_prefix,), count), torch.arange(count)])
        owner = slots.to(device)[None].expand(batch, -1)
    return Tokens(
        x=patches,
        size=patches.new_ones(batch, count, 1, dtype=torch.float32),
        kind=torch.zeros(batch, count, dtype=torch.long, device=device),
        source=source,
        position=initial_positions(batch, 0, count, device) if with_positions else None,
        owner=owner,
    )


def insert_prefix(tokens: Tokens, new_x: torch.Tensor, kind: int, first_slot: int, at: int) -> Tokens:
    """Insert prefix tokens (size 1, no position) at index `at`; they are slots first_slot.. of the full sequence."""
    batch, count = new_x.shape[:2]
    device = new_x.device

    def spliced(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return torch.cat([old[:, :at], new, old[:, at:]], dim=1)

    source = None
    if tokens.source is not None:
        eye = torch.eye(tokens.source.shape[-1], device=device, dtype=tokens.source.dtype)
        source = spliced(tokens.source, eye[first_slot : first_slot + count][None].expand(batch, -1, -1))
    owner = None
    if tokens.owner is not None:
        owner = tokens.owner + count * (tokens.owner >= at)  # tokens at or after `at` move right
        new_slots = at + torch.arange(count, device=device)
        owner = torch.cat(
            [owner[:, :first_slot], new_slots[None].expand(batch, -1), owner[:, first_slot + count :]], dim=1
        )
    return Tokens(
        x=spliced(tokens.x, new_x),
        size=spliced(tokens.size, tokens.size.new_ones(batch, count, 1)),
        kind=spliced(tokens.kind, tokens.kind.new_full((batch, count), kind)),
        source=source,
        position=None
        if tokens.position is None
        else spliced(tokens.position, tokens.position.new_full((batch, count), NO_POSITION)),
        owner=owner,
    )


def slot_owner(source: torch.Tensor) -> torch.Tensor:
    """(B, T, N) sources -> (B, N): the token that holds each slot of the full sequence (each slot is in
    exactly one token; a slot that has not entered yet reads 0). The same map the forward tracks as
    `ForwardRecord.owner`, here read off traced sources."""
    return source.argmax(dim=1)


def unmerge_to_grid(x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """(B, T, C) merged tokens -> (B, N, C) on the model's full sequence: every slot takes the
    features of the token that holds it (zeros for a prefix slot that has not entered yet)."""
    padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[-1])], dim=1)
    return padded.gather(1, owner[..., None].expand(-1, -1, x.shape[-1]))
