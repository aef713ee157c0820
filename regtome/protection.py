"""What each protection mode means, stated once: every other module reads a `Protection`.

A mode answers three questions about the prefix tokens (class and distillation tokens always stay
where they are and never merge):
- do the registers take part in the matching (`merges_registers`)?
- may a token merge only with tokens of its own kind (`kinds_apart`), so that a register never
  merges into a patch?
- which kinds does a pool over "the patches" take (`pooled_kinds`)?

Adding a mode is adding one entry to `PROTECTIONS` (and its tests); the matching, the cap, pooling,
the record, the FLOP count and the CLI read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kinds import PATCH, REGISTER


@dataclass(frozen=True)
class Protection:
    """One protection mode."""

    name: str
    merges_registers: bool  # registers are among the mergeable tokens
    kinds_apart: bool  # a token merges only with a token of its own kind
    pooled_kinds: frozenset[int]  # the kinds an average or attention pool takes (it never takes class tokens)
    summary: str  # one line for messages

    @property
    def registers_reach_patches(self) -> bool:
        """A register may end up inside a patch token: registers are then not counted one by one."""
        return self.merges_registers and not self.kinds_apart

    def num_protected(self, num_class: int, num_register: int) -> int:
        """Leading tokens that never merge, given the class and register tokens present."""
        return num_class + (0 if self.merges_registers else num_register)

    def unpooled_lead(self, num_class: int, num_register: int) -> int:
        """Before any merge the prefix leads the sequence: how many leading tokens a pool leaves out."""
        return num_class + (0 if REGISTER in self.pooled_kinds else num_register)


PROTECTIONS: dict[str, Protection] = {
    "prefix": Protection(
        "prefix",
        merges_registers=False,
        kinds_apart=False,
        pooled_kinds=frozenset({PATCH}),
        summary="class and register tokens never merge",
    ),
    "class": Protection(
        "class",
        merges_registers=True,
        kinds_apart=False,
        pooled_kinds=frozenset({PATCH, REGISTER}),
        summary="only class tokens are protected; registers merge like patches (ToMe)",
    ),
    "apart": Protection(
        "apart",
        merges_registers=True,
        kinds_apart=True,
        pooled_kinds=frozenset({PATCH}),
        summary="registers merge only with registers, patches only with patches",
    ),
}
PROTECT_MODES = tuple(PROTECTIONS)
DEFAULT_PROTECT = "apart"  # the one default of regtome.patch.timm, regtome.patch.transformers and the CLI


def protection(name: str) -> Protection:
    """The `Protection` called `name`; ValueError naming the modes for anything else."""
    try:
        return PROTECTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"protect must be one of {PROTECT_MODES}, got {name!r}") from None
