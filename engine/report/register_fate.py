"""Where the registers go when they are not protected (protect="class", ToMe's rule, or "apart"): after each
block, each register sits alone, merged with other registers only, or in a token that also holds patches. Counted
over a data set with `regtome.trace`, per block and per register."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

import regtome

from . import save_figure

FATES = {"alone": "#4c72b0", "with_registers": "#dd8452", "with_patches": "#c44e52"}  # each with its colour


@torch.no_grad()
def register_fates(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    prepare: Callable[[torch.Tensor], torch.Tensor] = nn.Identity(),
    protect: str = "class",
) -> dict[str, Any]:
    """Counts[block][register][fate] over every image of `loader`, at the model's current r."""
    layout = regtome.prefix_layout(model)
    if layout.num_register == 0:
        raise ValueError("the model has no register tokens")
    nc, p, depth = layout.num_class, layout.num_prefix, model.regtome_num_blocks
    counts = torch.zeros(depth, layout.num_register, len(FATES), dtype=torch.long)
    images_seen, cosine_sum = 0, 0.0
    model.eval()
    for images, _ in loader:
        images = prepare(images.to(device))
        with regtome.options(model, r=0):  # how alike the registers' output features are, unmerged
            registers = torch.nn.functional.normalize(model.forward_features(images)[:, nc:p].float(), dim=-1)
        cosine = registers @ registers.transpose(1, 2)
        off_diagonal = layout.num_register * (layout.num_register - 1)
        cosine_sum += float((cosine.sum(dim=(1, 2)) - layout.num_register).sum()) / max(off_diagonal, 1)
        with regtome.options(model, protect=protect):
            record = regtome.trace(model, images)  # one pass, every block
        for block in range(depth):
            source = record.blocks[block].source  # (B, T, N)
            owner = regtome.slot_owner(source)  # (B, N): the output token that holds each slot
            holder = source[torch.arange(len(owner))[:, None], owner[:, nc:p]]  # (B, R, N): each register's token
            patches, registers = holder[..., p:].sum(dim=-1), holder[..., nc:p].sum(dim=-1)
            fate = torch.where(patches > 0, 2, torch.where(registers > 1, 1, 0))  # (B, R)
            counts[block] += nn.functional.one_hot(fate.cpu(), len(FATES)).sum(dim=0)
        images_seen += len(images)
    return {
        "protect": protect,
        "images": images_seen,
        "fates": list(FATES),
        "register_cosine_unmerged": cosine_sum / max(images_seen, 1),
        "counts": counts.tolist(),
        "fractions_per_block": {
            fate: (counts[:, :, i].sum(dim=1).float() / counts[0].sum().clamp(min=1)).tolist()
            for i, fate in enumerate(FATES)
        },
    }


def plot_fates(summary: dict[str, Any], path: str, title: str) -> None:
    fractions = summary["fractions_per_block"]
    blocks = list(range(len(fractions["alone"])))
    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.subplots()
    bottom = [0.0] * len(blocks)
    for fate, colour in FATES.items():
        values = [100 * v for v in fractions[fate]]
        ax.bar(blocks, values, bottom=bottom, color=colour, label=fate.replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="after block", ylabel="% of register tokens", xticks=blocks)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)
