"""What a forward pass of a patched model did: `ForwardRecord` (read it with `regtome.last_forward`
or get one for chosen blocks with `regtome.trace`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .layout import PrefixLayout


@dataclass(frozen=True)
class BlockTrace:
    """The tokens after one block (from `regtome.trace`).

    x: (B, T, C) the tokens. size: (B, T, 1) fp32 patches per token. kind: (B, T) token kinds
    (`regtome.kinds`). source: (B, T, N) 0/1, which of the model's N tokens each token holds (when
    the pass traced sources). position: (B, T) rotary table rows (RoPE models), else None.
    owner: (B, N) which token holds each slot of the model's sequence, when the pass tracked it.
    """

    x: torch.Tensor
    size: torch.Tensor
    kind: torch.Tensor
    source: Optional[torch.Tensor]
    position: Optional[torch.Tensor] = None
    owner: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class ForwardRecord:
    """What the last forward pass of a patched model did.

    size: (B, T, 1) fp32, how many of the model's tokens each output token stands for (prefix tokens 1).
    source: (B, T, N) 0/1 with ``trace_source=True``: which of the N tokens of the model's full
        sequence each output token is made of; else None.
    kind: (B, T) the kind of each output token (`regtome.PATCH`, `REGISTER`, `CLASS`).
    tokens: tokens left after each block.
    r: tokens actually merged in each block (the requested r, capped).
    r_requested: the requested r per block (`regtome.parse_r` of the model's r).
    register_tokens: (B, blocks) register tokens left after each block, per image (under
        protect="apart" merged registers count once); None under protect="class", where a register
        may sit inside a patch token (use trace_source to follow it).
    layout: the prefix (class/distillation and register tokens) of the model.
    protect: the protection mode the pass ran with.
    num_protected: protected tokens at the front of the output.
    blocks: block index -> `BlockTrace` after that block, for the blocks the pass was asked to keep
        (`regtome.trace`, `regtome.dense_features`).
    owner: (B, N) long, for each slot of the model's full sequence the output token that holds it
        (the merge decisions of the whole pass in one tensor), when the pass tracked it.
    """

    size: torch.Tensor
    source: Optional[torch.Tensor]
    kind: torch.Tensor
    tokens: tuple[int, ...]
    r: tuple[int, ...]
    r_requested: tuple[int, ...]
    register_tokens: Optional[torch.Tensor]
    layout: PrefixLayout
    protect: str
    num_protected: int
    blocks: dict[int, BlockTrace] = field(default_factory=dict)
    owner: Optional[torch.Tensor] = None
