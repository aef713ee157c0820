"""task=visualize: what merging merges, and what the class token and registers attend to.

Per image, one grid PNG (also sent to TensorBoard), titled with its true and predicted class:
- one row per protection mode (prefix, class, apart; or the model's own with
  visualize.compare_protect=false): the image, then the merged-token map after each chosen block:
  the patches of each output token filled with their mean colour and outlined, as in the ToMe paper;
- then one row per prefix token (class, registers): its attention over the patches, per head, at
  `attn_block`, with a colour bar. Computed on the unmerged model so every patch has its own cell;
  under protect=apart, on the merged model, so registers merged together are one row.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import regtome
from data import class_names, count_classes
from data.images import load_images

from ..cli.overrides import config_from_checkpoint
from ..models.build import logits_of, model_label
from ..run.session import open_session

log = logging.getLogger(__name__)
CELL_PX = 160  # every subplot is CELL_PX x CELL_PX pixels, so the grid's size is known in advance


def patch_groups(source: torch.Tensor, num_prefix: int) -> np.ndarray:
    """Which output token each patch went into: (T, N) source of one image -> (N - num_prefix,) labels.

    Labels are renumbered 0..G-1 in order of first appearance; G is the number of output tokens
    that hold patches.
    """
    patch_columns = source[:, num_prefix:]
    owners = patch_columns.float().argmax(dim=0).cpu().numpy()  # each patch is in exactly one row
    _, labels = np.unique(owners, return_inverse=True)
    return labels


def merge_map(image: np.ndarray, labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fill each group of patches with its mean colour and outline the groups in black.

    image: (H, W, 3) floats in [0, 1] with H, W multiples of the grid; labels: (gh * gw,).
    """
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


def sources_after_blocks(model: nn.Module, images: torch.Tensor, blocks: list[int]) -> dict[int, torch.Tensor]:
    """The token sources after each block in `blocks`, from one traced forward pass."""
    with torch.no_grad():
        record = regtome.trace(model, images, blocks)
    return {block: record.blocks[block].source for block in blocks}


def grid_shape(num_blocks: int, num_heads: int, num_prefix: int, num_modes: int) -> tuple[int, int]:
    rows = num_modes + num_prefix
    cols = max(1 + num_blocks, num_heads)
    return rows, cols


def draw_grid(image: np.ndarray, maps: dict[str, dict[int, np.ndarray]], tokens: dict[str, dict[int, int]],
              attention: np.ndarray, names: list[str], attention_note: str, attn_block: int, path: Path,
              title: str = "") -> np.ndarray:
    """Save the grid PNG and return it as an (H, W, 3) uint8 array. attention: (heads, P, N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = sorted(next(iter(maps.values())))
    num_heads = attention.shape[0]
    rows, cols = grid_shape(len(blocks), num_heads, len(names), len(maps))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * CELL_PX / 100, rows * CELL_PX / 100), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, (mode, by_block) in enumerate(maps.items()):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(f"protect={mode}", fontsize=7)
        for col, block in enumerate(blocks, start=1):
            axes[row, col].imshow(by_block[block])
            axes[row, col].set_title(f"block {block}: {tokens[mode][block]} tokens", fontsize=7)
    side = int(round(attention.shape[-1] ** 0.5))
    for i, name in enumerate(names):
        row = len(maps) + i
        high = float(attention[:, i].max())  # one colour scale per row: heads compare directly
        for head in range(num_heads):
            shown = axes[row, head].imshow(attention[head, i].reshape(side, -1), cmap="inferno", vmin=0, vmax=high)
            axes[row, head].set_title(f"{name} h{head}", fontsize=6)
        # the colour bar sits in the row's next free cell, or just right of the last head when there is none
        host = axes[row, num_heads] if cols > num_heads else axes[row, num_heads - 1]
        cax = host.inset_axes([0.05, 0.1, 0.08, 0.8] if cols > num_heads else [1.03, 0.1, 0.05, 0.8])
        bar = fig.colorbar(shown, cax=cax)
        bar.ax.tick_params(labelsize=5)
        bar.set_label("attention", fontsize=5)
    fig.suptitle(f"{title}\nrows 1-{len(maps)}: merged tokens; below: attention over patches at block {attn_block} "
                 f"({attention_note})", fontsize=7)
    fig.subplots_adjust(left=0.02, right=0.95, top=1 - 0.75 / rows, bottom=0.02, hspace=0.35, wspace=0.1)
    fig.savefig(path)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return pixels


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


@torch.no_grad()
def draw_dense_features(model: nn.Module, batch: torch.Tensor, picture: np.ndarray, path: Path, title: str) -> None:
    """Image | last block's patch features at r=0 | merged and put back on the grid (PCA to RGB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with regtome.options(model, r=0):
        dense = regtome.dense_features(model, batch)
    merged = regtome.dense_features(model, batch)
    tokens = regtome.last_forward(model).tokens[-1]
    images = pca_rgb(dense[0], merged[0])
    fig, axes = plt.subplots(1, 3, figsize=(3 * CELL_PX / 100, CELL_PX / 100 + 0.45), dpi=100)
    panels = [(picture, "image"), (images[0], "features, r=0"), (images[1], f"merged ({tokens} tokens), unmerged")]
    for ax, (image, label) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.7, bottom=0.02, wspace=0.05)
    fig.savefig(path)
    plt.close(fig)


def _to_display(tensor: torch.Tensor, config: dict[str, Any]) -> np.ndarray:
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    return (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _label(classes: Optional[list[str]], index: Optional[int]) -> str:
    if index is None:
        return "?"
    return classes[index] if classes and index < len(classes) else str(index)


def merge_maps(model: nn.Module, batch: torch.Tensor, picture: np.ndarray, blocks: list[int], modes: list[str]
               ) -> tuple[dict, dict, dict]:
    """Per protection mode and block: the merged-token map, the tokens left, the groups holding patches."""
    grid = regtome.patch_grid(model, *batch.shape[-2:])
    num_prefix = regtome.prefix_layout(model).num_prefix
    maps, tokens, groups = {}, {}, {}
    for mode in modes:
        with regtome.options(model, protect=mode):
            sources = sources_after_blocks(model, batch, blocks)
        maps[mode], tokens[mode], groups[mode] = {}, {}, {}
        for block, source in sources.items():
            labels = patch_groups(source[0], num_prefix)
            maps[mode][block] = merge_map(picture, labels, grid)
            tokens[mode][block] = source.shape[1]
            groups[mode][block] = int(labels.max()) + 1
    return maps, tokens, groups


def prefix_rows(model: nn.Module, batch: torch.Tensor, attn_block: int) -> tuple[np.ndarray, list[str], str]:
    """The attention rows to draw: one per prefix token; under protect=apart one per merged token.
    None of them for a model `regtome.prefix_attention` does not read (transformers models)."""
    mode = regtome.protection(model.protect)
    registers_merge_alone = mode.merges_registers and mode.kinds_apart  # their rows merge with each other only
    merged = registers_merge_alone and any(regtome.last_forward(model).r_requested[:attn_block])
    try:
        attention, names = regtome.prefix_attention(model, batch, attn_block, merged=merged)
    except TypeError:  # a block prefix_attention does not read
        return np.zeros((1, 0, 1)), [], "prefix attention maps are drawn for timm's pre-norm blocks only"
    attention = attention[0].cpu().numpy()
    keep = [i for i, name in enumerate(names) if name not in names[:i]]  # a merged token once
    note = "merged model, registers merged together shown once" if merged else "unmerged model"
    return attention[:, keep], [names[i] for i in keep], note


@dataclass
class Plan:
    """What every image of a task=visualize run is drawn with."""

    model: nn.Module
    device: torch.device
    inputs: dict[str, Any]  # the data config (mean/std to undo for display)
    classes: Optional[list[str]]
    blocks: list[int]  # merge maps after these blocks
    attn_block: int  # prefix attention at this block
    modes: list[str]  # merge maps under these protection modes
    dense_features: bool
    summary: dict[str, Any]  # model label, r, ...; visualize.json
    run_dir: Path


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    cfg, weights, saved_classes = config_from_checkpoint(cfg, overrides)
    random_weights = weights is None and not (cfg.model.pretrained or cfg.model.pretrained_file)
    if random_weights:
        log.warning("showing a model with random weights (no ckpt=PATH, model.pretrained or model.pretrained_file): "
                    "the merges and attention maps say nothing about a trained model")
    session = open_session(cfg, count_classes(cfg.dataset), weights, cfg.ckpt, trace_source=True, distributed=False)
    model = session.model.eval()
    classes = saved_classes or class_names(cfg.dataset)
    images = load_images(cfg, session.inputs, classes, cfg.visualize.num_samples)
    depth = model.regtome_num_blocks
    plan = Plan(model=model, device=session.device, inputs=session.inputs, classes=classes, run_dir=run_dir,
                blocks=sorted({min(max(b, 0), depth - 1) for b in cfg.visualize.blocks}),
                attn_block=cfg.visualize.attn_block % depth, dense_features=bool(cfg.visualize.dense_features),
                modes=list(regtome.PROTECT_MODES) if cfg.visualize.compare_protect else [model.protect],
                summary={"model": model_label(cfg.model), "r": OmegaConf.to_container(cfg.tome)["r"],
                         "protect": model.protect, "random_weights": random_weights, "images": {}})
    plan.summary |= {"blocks": plan.blocks, "attn_block": plan.attn_block}
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    try:
        for step, (name, tensor, target) in enumerate(tqdm(images, desc="visualize", dynamic_ncols=True)):
            info, pixels = draw_image(plan, name, tensor, target)
            plan.summary["images"][name] = info
            writer.add_image(f"visualize/{name}", pixels, step, dataformats="HWC")
    finally:
        writer.close()
    (run_dir / "visualize.json").write_text(json.dumps(plan.summary, indent=2) + "\n")
    log.info("wrote %d grids to %s", len(images), run_dir)
    return plan.summary


def draw_image(plan: Plan, name: str, tensor: torch.Tensor, target: Optional[int]) -> tuple[dict[str, Any], np.ndarray]:
    """One image's grid (and dense features); returns its visualize.json entry and the grid's pixels."""
    model, summary = plan.model, plan.summary
    batch = tensor[None].to(plan.device)
    picture = _to_display(tensor, plan.inputs)
    with torch.no_grad():
        probabilities = logits_of(model(batch)).float().softmax(dim=-1)[0]
    predicted = int(probabilities.argmax())
    maps, tokens, groups = merge_maps(model, batch, picture, plan.blocks, plan.modes)
    attention, names, note = prefix_rows(model, batch, plan.attn_block)
    summary.setdefault("prefix_tokens", names)
    caption = (f"true: {_label(plan.classes, target)}, predicted: {_label(plan.classes, predicted)} "
               f"(p={float(probabilities[predicted]):.2f})")
    title = (f"{name}: {caption}\n{summary['model']}, r={summary['r']}, protect={model.protect}"
             + (" (random weights)" if summary["random_weights"] else ""))
    pixels = draw_grid(picture, maps, tokens, attention, names, note, plan.attn_block, plan.run_dir / f"{name}.png",
                       title=title)
    if plan.dense_features:
        draw_dense_features(model, batch, picture, plan.run_dir / f"{name}_features.png",
                            f"{name}: last block's patch features (PCA to RGB), r={summary['r']}\n{summary['model']}")
    info = {"png": f"{name}.png", "tokens": tokens, "groups": groups, "size": list(pixels.shape[:2]),
            "true": _label(plan.classes, target), "predicted": _label(plan.classes, predicted),
            "probability": float(probabilities[predicted])}
    return info, pixels
