"""task=visualize: what merging merges, and what the class token and registers attend to. Per image, one grid
PNG (also in TensorBoard), titled with its true and predicted class: one row per protection mode (or only the
model's own, visualize.compare_protect=false) with the image and its merged-token map after each chosen block
(each output token's patches in their mean colour, outlined, as in the ToMe paper); then one row per prefix
token with its attention over the patches per head at `attn_block`, on the unmerged model so every patch has its
own cell (under protect=apart on the merged model, so registers merged together are one row)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import regtome
from data import count_classes, preprocessing
from data.images import load_images

from ..errors import UserError
from ..models.build import WEIGHTS_HINT, has_weights, logits_of, model_label
from ..report import fit_title, save_figure
from ..run.checkpoint import config_from_checkpoint, label_order
from ..run.results import merge_record, r_that_ran, write_results
from ..run.session import open_session

log = logging.getLogger(__name__)
CELL_PX = 160  # every subplot is CELL_PX x CELL_PX pixels, so the grid's size is known in advance


def _label(classes: Optional[list[str]], index: int) -> str:
    return classes[index] if classes and index < len(classes) else str(index)


def prefix_rows(model: nn.Module, batch: torch.Tensor, attn_block: int) -> tuple[np.ndarray, list[str], str]:
    """The attention rows to draw: one per prefix token; under protect=apart one per merged token.
    None of them for a model `regtome.prefix_attention` does not read (transformers models)."""
    mode = regtome.protection(model.protect)  # registers merged with each other only (kinds apart): so are their rows
    merged = mode.merges_registers and mode.kinds_apart and any(regtome.last_forward(model).r_requested[:attn_block])
    if regtome.prefix_attention_support(model, attn_block) is not None:  # asked, not caught: a TypeError is a bug
        return np.zeros((1, 0, 1)), [], "prefix attention maps are drawn for timm's pre-norm blocks only"
    attention, names = regtome.prefix_attention(model, batch, attn_block, merged=merged)
    keep = [i for i, name in enumerate(names) if name not in names[:i]]  # a merged token once
    note = "merged model, registers merged together shown once" if merged else "unmerged model"
    return attention[0][:, keep].cpu().numpy(), [names[i] for i in keep], note


def chosen_blocks(blocks: Optional[list[int]], depth: int, key: str = "visualize.blocks") -> list[int]:
    """Blocks given as Python indices (-1: the last) as sorted positions in a model of `depth` blocks, one it lacks
    refused under `key`; null: after a third, two thirds and all of the model's blocks."""
    if blocks is None:
        return sorted({max(depth * third // 3 - 1, 0) for third in (1, 2, 3)})
    for index in blocks:
        if not -depth <= index < depth:
            raise UserError(
                f"{key}: block {index} does not exist in a model of {depth} blocks; "
                f"give indices from {-depth} to {depth - 1} (-1: the last)"
            )
    return sorted({index % depth for index in blocks})


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    cfg, saved = config_from_checkpoint(cfg, overrides)
    random_weights = saved is None and not has_weights(cfg.model)
    if random_weights:
        log.warning(
            f"showing a model with random weights (none of {WEIGHTS_HINT}): "
            "the merges and attention maps say nothing about a trained model"
        )
    weights = saved.weights if saved else None
    session = open_session(cfg, count_classes(cfg.dataset), weights, cfg.ckpt, trace_source=True, distributed=False)
    model = session.model.eval()
    classes = label_order(cfg.dataset, saved)
    images = load_images(cfg, session.inputs, classes, cfg.visualize.num_samples, "visualize.num_samples")
    depth = model.regtome_num_blocks
    blocks = chosen_blocks(cfg.visualize.blocks, depth)
    attn_block = chosen_blocks([cfg.visualize.attn_block], depth, "visualize.attn_block")[0]
    modes = list(regtome.PROTECT_MODES) if cfg.visualize.compare_protect else [model.protect]
    num_prefix = regtome.prefix_layout(model).num_prefix
    mean, std = (torch.tensor(session.inputs[key])[:, None, None] for key in ("mean", "std"))  # undone for display
    summary: dict[str, Any] = {
        "model": model_label(cfg.model),
        **merge_record(model, session.inputs["input_size"]),
        "preprocessing": preprocessing(cfg.dataset, session.inputs),
        "random_weights": random_weights,
        "images": {},
        "blocks": blocks,
        "attn_block": attn_block,
    }
    r_ran = r_that_ran(summary)
    weights_note = " (random weights)" if random_weights else ""
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for step, (name, tensor, target) in enumerate(tqdm(images, desc="visualize", dynamic_ncols=True)):
            batch = tensor[None].to(session.device)
            picture = (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
            with torch.no_grad():
                probabilities = logits_of(model(batch)).float().softmax(dim=-1)[0]
            predicted = int(probabilities.argmax())
            grid = regtome.patch_grid(model, *batch.shape[-2:])
            maps, tokens, groups = {}, {}, {}  # per mode and block: merged-token map, tokens left, groups of patches
            for mode in modes:
                with regtome.options(model, protect=mode), torch.no_grad():
                    record = regtome.trace(model, batch, blocks)
                labels = {block: patch_groups(record.blocks[block].source[0], num_prefix) for block in blocks}
                maps[mode] = {block: merge_map(picture, labels[block], grid) for block in blocks}
                tokens[mode] = {block: record.blocks[block].source.shape[1] for block in blocks}
                groups[mode] = {block: int(labels[block].max()) + 1 for block in blocks}
            attention, names, note = prefix_rows(model, batch, attn_block)
            summary.setdefault("prefix_tokens", names)
            caption = f"predicted: {_label(classes, predicted)} (p={float(probabilities[predicted]):.2f})"
            if target is not None:  # images= files have no label
                caption = f"true: {_label(classes, target)}, {caption}"
            title = f"{name}: {caption}\n{summary['model']}, r={r_ran}, protect={model.protect}{weights_note}"
            png = run_dir / f"{name}.png"
            pixels = draw_grid(picture, maps, tokens, attention, names, note, attn_block, png, title, depth)
            if cfg.visualize.dense_features:
                features = f"{name}: last block's patch features (PCA to RGB), r={r_ran}\n{summary['model']}"
                draw_dense_features(model, batch, picture, run_dir / f"{name}_features.png", features)
            summary["images"][name] = {
                "png": f"{name}.png",
                "tokens": tokens,
                "groups": groups,
                "size": list(pixels.shape[:2]),
                "true": None if target is None else _label(classes, target),
                "predicted": _label(classes, predicted),
                "probability": float(probabilities[predicted]),
            }
            writer.add_image(f"visualize/{name}", pixels, step, dataformats="HWC")
    write_results(run_dir, summary, name="visualize.json")
    log.info("wrote %d grids to %s (r=%s, protect=%s)", len(images), run_dir, r_ran, model.protect)
    return summary


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
    edge = np.diff(pixel_labels, axis=0, append=pixel_labels[-1:]) != 0  # the pixel below is another group's
    edge |= np.diff(pixel_labels, axis=1, append=pixel_labels[:, -1:]) != 0  # or the pixel to the right
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


@torch.no_grad()
def draw_dense_features(model: nn.Module, batch: torch.Tensor, picture: np.ndarray, path: Path, title: str) -> None:
    """Image | last block's patch features at r=0 | merged and put back on the grid, as the 3 principal components
    of the r=0 features: one basis and colour scale for both, so colours can be compared."""
    with regtome.options(model, r=0):
        dense = regtome.dense_features(model, batch)[0]
    merged = regtome.dense_features(model, batch)[0]
    tokens = regtome.last_forward(model).tokens[-1]
    flat = [features.reshape(dense.shape[0], -1).T.float() for features in (dense, merged)]  # (H * W, C)
    mean = flat[0].mean(dim=0)
    _, _, basis = torch.linalg.svd(flat[0] - mean, full_matrices=False)
    values = [(points - mean) @ basis[:3].T for points in flat]
    low, high = values[0].min(dim=0).values, values[0].max(dim=0).values
    rgb = [((v - low) / (high - low).clamp(min=1e-6)).clamp(0, 1) for v in values]
    images = [colours.reshape(*maps.shape[1:], 3).cpu().numpy() for colours, maps in zip(rgb, (dense, merged))]
    fig = Figure(figsize=(3 * CELL_PX / 100, CELL_PX / 100 + 0.45), dpi=100)
    panels = [(picture, "image"), (images[0], "features, r=0"), (images[1], f"merged ({tokens} tokens), unmerged")]
    for ax, (image, label) in zip(fig.subplots(1, 3), panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.suptitle(fit_title(title, 3 * CELL_PX / 100), fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.7, bottom=0.02, wspace=0.05)
    save_figure(fig, path)
