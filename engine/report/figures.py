"""The pictures of task=visualize: merged-token maps (as in the ToMe paper), the grid of maps and prefix-token
attention, and dense features as PCA colours. Pure drawing: arrays in, PNG files out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import regtome

from . import fit_title, save_figure

CELL_PX = 160  # every subplot is CELL_PX x CELL_PX pixels, so the grid's size is known in advance


def patch_groups(source: torch.Tensor, num_prefix: int) -> np.ndarray:
    """Which output token each patch went into: (T, N) source of one image -> (N - num_prefix,) labels,
    renumbered 0..G-1 in order of first appearance (G: the output tokens that hold patches)."""
    owners = regtome.slot_owner(source[None].float())[0, num_prefix:].cpu().numpy()
    _, labels = np.unique(owners, return_inverse=True)
    return labels


def merge_map(image: np.ndarray, labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Each group of patches filled with its mean colour and outlined in black.
    image: (H, W, 3) floats in [0, 1], H and W multiples of the grid; labels: (gh * gw,)."""
    gh, gw = grid
    ph, pw = image.shape[0] // gh, image.shape[1] // gw
    pixel_labels = np.kron(labels.reshape(gh, gw), np.ones((ph, pw), dtype=labels.dtype))
    out = np.zeros_like(image)
    for group in np.unique(labels):
        mask = pixel_labels == group
        out[mask] = image[mask].mean(axis=0)
    edge = np.zeros(pixel_labels.shape, dtype=bool)
    edge[:-1, :] |= pixel_labels[:-1, :] != pixel_labels[1:, :]
    edge[:, :-1] |= pixel_labels[:, :-1] != pixel_labels[:, 1:]
    out[edge] = 0.0
    return out


def grid_shape(num_blocks: int, num_heads: int, num_prefix: int, num_modes: int) -> tuple[int, int]:
    return num_modes + num_prefix, max(1 + num_blocks, num_heads)


def draw_grid(
    image: np.ndarray,
    maps: dict[str, dict[int, np.ndarray]],
    tokens: dict[str, dict[int, int]],
    attention: np.ndarray,
    names: list[str],
    attention_note: str,
    attn_block: int,
    path: Path,
    title: str = "",
    depth: int = 0,
) -> np.ndarray:
    """Save the grid PNG and return it as an (H, W, 3) uint8 array. attention: (heads, P, N). Blocks are
    0-based indices (as visualize.blocks); titles count them from 1 of `depth`."""
    blocks = sorted(next(iter(maps.values())))
    num_heads = attention.shape[0]
    rows, cols = grid_shape(len(blocks), num_heads, len(names), len(maps))
    fig = Figure(figsize=(cols * CELL_PX / 100, rows * CELL_PX / 100), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (mode, by_block) in enumerate(maps.items()):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(f"protect={mode}", fontsize=7)
        for col, block in enumerate(blocks, start=1):
            axes[row, col].imshow(by_block[block])
            axes[row, col].set_title(f"after block {block + 1} of {depth}:\n{tokens[mode][block]} tokens", fontsize=7)
    side = int(round(attention.shape[-1] ** 0.5))
    for i, name in enumerate(names):
        row = len(maps) + i
        high = float(attention[:, i].max())  # one colour scale per row: heads compare directly
        for head in range(num_heads):
            shown = axes[row, head].imshow(attention[head, i].reshape(side, -1), cmap="inferno", vmin=0, vmax=high)
            axes[row, head].set_title(f"{name}, head {head + 1}", fontsize=6)
        # the colour bar sits in the row's next free cell, or just right of the last head when there is none
        host = axes[row, num_heads] if cols > num_heads else axes[row, num_heads - 1]
        cax = host.inset_axes([0.05, 0.1, 0.08, 0.8] if cols > num_heads else [1.03, 0.1, 0.05, 0.8])
        bar = fig.colorbar(shown, cax=cax)
        bar.ax.tick_params(labelsize=5)
        bar.set_label("attention", fontsize=5)
    suptitle = fit_title(
        f"{title}\nrows 1-{len(maps)}: merged tokens; below: attention over the patches in block {attn_block + 1} "
        f"of {depth}, one panel per head ({attention_note})",
        cols * CELL_PX / 100,
    )
    height = rows * CELL_PX / 100
    fig.suptitle(suptitle, fontsize=7, y=1 - 0.06 / height, va="top")
    title_inches = 0.06 + 0.14 * (suptitle.count("\n") + 1) + 0.32  # its lines, then the first row's two-line titles
    fig.subplots_adjust(left=0.02, right=0.95, top=1 - title_inches / height, bottom=0.02, hspace=0.35, wspace=0.1)
    canvas = FigureCanvasAgg(fig)  # the pixels returned
    save_figure(fig, path)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def pca_rgb(reference: torch.Tensor, *others: torch.Tensor) -> list[np.ndarray]:
    """(C, H, W) feature maps -> (H, W, 3) images: the 3 principal components of `reference`,
    the same basis and colour scale for every map, so colours can be compared."""
    channels = reference.shape[0]
    flat = reference.reshape(channels, -1).T.float()
    mean = flat.mean(dim=0)
    _, _, basis = torch.linalg.svd(flat - mean, full_matrices=False)
    basis = basis[:3].T  # (C, 3)
    projected = (flat - mean) @ basis
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    out = []
    for features in (reference, *others):
        values = (features.reshape(channels, -1).T.float() - mean) @ basis
        rgb = ((values - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)
        out.append(rgb.reshape(*features.shape[1:], 3).cpu().numpy())
    return out


def draw_feature_panels(
    picture: np.ndarray, dense: torch.Tensor, merged: torch.Tensor, tokens: int, path: Path, title: str
) -> None:
    """Image | (C, H, W) features at r=0 | merged and put back on the grid, in one PCA colour basis."""
    images = pca_rgb(dense, merged)
    fig = Figure(figsize=(3 * CELL_PX / 100, CELL_PX / 100 + 0.45), dpi=100)
    panels = [(picture, "image"), (images[0], "features, r=0"), (images[1], f"merged ({tokens} tokens), unmerged")]
    for ax, (image, label) in zip(fig.subplots(1, 3), panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.suptitle(fit_title(title, 3 * CELL_PX / 100), fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.7, bottom=0.02, wspace=0.05)
    save_figure(fig, path)
