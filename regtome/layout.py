"""The token layout of a ViT and the one rule for which tokens may merge at each block.

timm and transformers build the sequence ``[class, (distillation), registers..., patches...]``
(DINOv3's storage tokens are its registers). The class and distillation tokens ("class tokens")
and the registers are the prefix. Each token carries a kind (`PATCH`, `REGISTER`, `CLASS`) that
travels with it through the merges.

What `protect` means:
- ``"prefix"``: no prefix token ever merges (class tokens and registers stay at their slots).
- ``"class"``: only the class tokens are protected; registers merge like patches (ToMe's rule).
- ``"apart"``: class tokens never merge; a register may merge only with registers and a patch
  only with patches, so no token ever holds both a register and a patch.

`prefix_schedule` is the single place that says, block by block, which prefix tokens have entered
(``class_layer``/``register_layer``), how many leading tokens are protected and whether kinds are
kept apart. The merging forward and the FLOP count both read it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

PATCH, REGISTER, CLASS = 0, 1, 2  # token kinds
PROTECT_MODES = ("prefix", "class", "apart")
DEFAULT_PROTECT = "apart"  # the one default of regtome.patch.timm, regtome.patch.transformers and the CLI


@dataclass(frozen=True)
class PrefixLayout:
    """How many class tokens (class + distillation) and register tokens lead the sequence."""

    num_class: int
    num_register: int

    @property
    def num_prefix(self) -> int:
        return self.num_class + self.num_register


def prefix_layout(model: nn.Module) -> PrefixLayout:
    """The prefix of a timm VisionTransformer / Eva, or of a model patched by `regtome.patch.transformers`."""
    layout = getattr(model, "regtome_layout", None)  # transformers models say it themselves
    if isinstance(layout, PrefixLayout):
        return layout
    reg_token = getattr(model, "reg_token", None)  # VisionTransformer and Eva (DINOv3's storage tokens)
    num_register = 0 if reg_token is None else int(reg_token.shape[1])
    return PrefixLayout(num_class=model.num_prefix_tokens - num_register, num_register=num_register)


@dataclass(frozen=True)
class BlockPrefix:
    """What leads the sequence when one block runs, and what its merge must respect.

    class_enters / registers_enter: the group joins the sequence right before this block.
    num_class / num_register: class and register tokens that have entered by this block.
    num_protected: leading tokens that never merge.
    apart: registers sit among the mergeable tokens but merge only with registers (at most
        `num_register` of them), patches only with patches.
    """

    class_enters: bool
    registers_enter: bool
    num_class: int
    num_register: int
    num_protected: int
    apart: bool


def prefix_schedule(layout: PrefixLayout, protect: str, class_layer: int, register_layer: int,
                    depth: int) -> list[BlockPrefix]:
    """One `BlockPrefix` per block: groups join at `class_layer` / `register_layer`, then stay."""
    out = []
    for block in range(depth):
        class_in = layout.num_class > 0 and class_layer <= block
        registers_in = layout.num_register > 0 and register_layer <= block
        num_class = layout.num_class if class_in else 0
        num_register = layout.num_register if registers_in else 0
        out.append(BlockPrefix(
            class_enters=layout.num_class > 0 and class_layer == block,
            registers_enter=layout.num_register > 0 and register_layer == block,
            num_class=num_class,
            num_register=num_register,
            num_protected=num_class + (num_register if protect == "prefix" else 0),
            apart=protect == "apart" and num_register > 0,
        ))
    return out


def prefix_names(model: nn.Module, block: int = 0) -> list[str]:
    """Names of the prefix tokens in the sequence at `block`, in order (class_layer/register_layer aware)."""
    layout = prefix_layout(model)
    has_class = getattr(model, "cls_token", None) is not None or getattr(model, "regtome_has_class", False)
    class_names = (["class"] if has_class else []) + ["distill"] * (layout.num_class - int(has_class))
    names = class_names if getattr(model, "class_layer", 0) <= block else []
    if getattr(model, "register_layer", 0) <= block:
        names += [f"register {i + 1}" for i in range(layout.num_register)]
    return names


def initial_kinds(batch: int, num_class: int, num_register: int, num_patches: int,
                  device: torch.device) -> torch.Tensor:
    """(B, T) kinds of a sequence ``[class tokens | registers | patches]``."""
    kinds = torch.cat([torch.full((num_class,), CLASS), torch.full((num_register,), REGISTER),
                       torch.full((num_patches,), PATCH)])
    return kinds.to(device)[None].expand(batch, -1)
