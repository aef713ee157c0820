"""The token layout of a ViT and the one rule for which tokens may merge at each block.

timm and transformers build the sequence ``[class, (distillation), registers..., patches...]``
(DINOv3's storage tokens are its registers). The class and distillation tokens ("class tokens")
and the registers are the prefix. Each token carries a kind (`regtome.kinds`) that travels with it
through the merges; what a protection mode does with each kind is `regtome.protection`.

`prefix_schedule` is the single place that says, block by block, which prefix tokens have entered
(``class_layer``/``register_layer``), how many leading tokens are protected and whether kinds are
kept apart. The merging forward and the FLOP count both read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kinds import CLASS, PATCH, REGISTER  # noqa: F401  (re-exported: kinds belong to the layout's story)
from .protection import Protection


@dataclass(frozen=True)
class PrefixLayout:
    """How many class tokens (class + distillation) and register tokens lead the sequence."""

    num_class: int
    num_register: int

    @property
    def num_prefix(self) -> int:
        return self.num_class + self.num_register


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


def prefix_schedule(
    layout: PrefixLayout, protection: Protection, class_layer: int, register_layer: int, depth: int
) -> list[BlockPrefix]:
    """One `BlockPrefix` per block: groups join at `class_layer` / `register_layer`, then stay."""
    out = []
    for block in range(depth):
        num_class = layout.num_class if layout.num_class > 0 and class_layer <= block else 0
        num_register = layout.num_register if layout.num_register > 0 and register_layer <= block else 0
        out.append(
            BlockPrefix(
                class_enters=layout.num_class > 0 and class_layer == block,
                registers_enter=layout.num_register > 0 and register_layer == block,
                num_class=num_class,
                num_register=num_register,
                num_protected=protection.num_protected(num_class, num_register),
                apart=protection.kinds_apart and protection.merges_registers and num_register > 0,
            )
        )
    return out


def prefix_names(layout: PrefixLayout, class_layer: int = 0, register_layer: int = 0, block: int = 0) -> list[str]:
    """Names of the prefix tokens in the sequence at `block`, in order (class_layer/register_layer aware):
    ``"class"``, ``"distill"``, ``"register 1"``, ..."""
    names = ["class"] + ["distill"] * (layout.num_class - 1) if layout.num_class and class_layer <= block else []
    if register_layer <= block:
        names += [f"register {i + 1}" for i in range(layout.num_register)]
    return names
