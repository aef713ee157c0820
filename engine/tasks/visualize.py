"""task=visualize: what merging merges, and what the class token and registers attend to. Per image, one grid
PNG (also in TensorBoard), titled with its true and predicted class: one row per protection mode (or only the
model's own, visualize.compare_protect=false) with the image and its merged-token map after each chosen block
(each output token's patches in their mean colour, outlined, as in the ToMe paper); then one row per prefix
token with its attention over the patches per head at `attn_block`, on the unmerged model so every patch has its
own cell (under protect=apart on the merged model, so registers merged together are one row).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import regtome
from data import count_classes, preprocessing
from data.images import load_images

from ..errors import UserError
from ..models.build import WEIGHTS_HINT, has_weights, logits_of, model_label
from ..report.figures import draw_feature_panels, draw_grid, merge_map, patch_groups
from ..run.checkpoint import config_from_checkpoint, label_order
from ..run.results import merge_record, r_that_ran, write_results
from ..run.session import open_session

log = logging.getLogger(__name__)


@torch.no_grad()
def draw_dense_features(model: nn.Module, batch: torch.Tensor, picture: np.ndarray, path: Path, title: str) -> None:
    """Image | last block's patch features at r=0 | merged and put back on the grid (PCA to RGB)."""
    with regtome.options(model, r=0):
        dense = regtome.dense_features(model, batch)
    merged = regtome.dense_features(model, batch)
    draw_feature_panels(picture, dense[0], merged[0], regtome.last_forward(model).tokens[-1], path, title)


def _to_display(tensor: torch.Tensor, config: dict[str, Any]) -> np.ndarray:
    mean, std = torch.tensor(config["mean"])[:, None, None], torch.tensor(config["std"])[:, None, None]
    return (tensor * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _label(classes: Optional[list[str]], index: Optional[int]) -> str:
    if index is None:
        return "?"
    return classes[index] if classes and index < len(classes) else str(index)


def merge_maps(
    model: nn.Module, batch: torch.Tensor, picture: np.ndarray, blocks: list[int], modes: list[str]
) -> tuple[dict, dict, dict]:
    """Per protection mode and block: the merged-token map, the tokens left, the groups holding patches."""
    grid = regtome.patch_grid(model, *batch.shape[-2:])
    num_prefix = regtome.prefix_layout(model).num_prefix
    maps, tokens, groups = {}, {}, {}
    for mode in modes:
        with regtome.options(model, protect=mode), torch.no_grad():
            record = regtome.trace(model, batch, blocks)
        maps[mode], tokens[mode], groups[mode] = {}, {}, {}
        for block in blocks:
            source = record.blocks[block].source
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
    if regtome.prefix_attention_support(model, attn_block) is not None:  # asked, not caught: a TypeError is a bug
        return np.zeros((1, 0, 1)), [], "prefix attention maps are drawn for timm's pre-norm blocks only"
    attention, names = regtome.prefix_attention(model, batch, attn_block, merged=merged)
    attention = attention[0].cpu().numpy()
    keep = [i for i, name in enumerate(names) if name not in names[:i]]  # a merged token once
    note = "merged model, registers merged together shown once" if merged else "unmerged model"
    return attention[:, keep], [names[i] for i in keep], note


def block_index(index: int, depth: int, key: str) -> int:
    """A block given as a Python index (-1: the last) as its position in a model of `depth` blocks."""
    if not -depth <= index < depth:
        raise UserError(
            f"{key}: block {index} does not exist in a model of {depth} blocks; "
            f"give indices from {-depth} to {depth - 1} (-1: the last)"
        )
    return index % depth


def chosen_blocks(blocks: Optional[list[int]], depth: int) -> list[int]:
    """visualize.blocks as sorted positions; null: after a third, two thirds and all of the model's blocks."""
    if blocks is None:
        return sorted({max(depth * third // 3 - 1, 0) for third in (1, 2, 3)})
    return sorted({block_index(b, depth, "visualize.blocks") for b in blocks})


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
    attn_block = block_index(cfg.visualize.attn_block, depth, "visualize.attn_block")
    summary = {
        "model": model_label(cfg.model),
        **merge_record(model, session.inputs["input_size"]),
        "preprocessing": preprocessing(cfg.dataset, session.inputs),
        "random_weights": random_weights,
        "images": {},
        "blocks": blocks,
        "attn_block": attn_block,
    }
    plan = Plan(
        model=model,
        device=session.device,
        inputs=session.inputs,
        classes=classes,
        blocks=blocks,
        attn_block=attn_block,
        modes=list(regtome.PROTECT_MODES) if cfg.visualize.compare_protect else [model.protect],
        dense_features=bool(cfg.visualize.dense_features),
        summary=summary,
        run_dir=run_dir,
    )
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    try:
        for step, (name, tensor, target) in enumerate(tqdm(images, desc="visualize", dynamic_ncols=True)):
            info, pixels = draw_image(plan, name, tensor, target)
            summary["images"][name] = info
            writer.add_image(f"visualize/{name}", pixels, step, dataformats="HWC")
    finally:
        writer.close()
    write_results(run_dir, summary, name="visualize.json")
    log.info("wrote %d grids to %s (r=%s, protect=%s)", len(images), run_dir, r_that_ran(summary), model.protect)
    return summary


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
    caption = f"predicted: {_label(plan.classes, predicted)} (p={float(probabilities[predicted]):.2f})"
    if target is not None:  # images= files have no label
        caption = f"true: {_label(plan.classes, target)}, {caption}"
    weights = " (random weights)" if summary["random_weights"] else ""
    title = f"{name}: {caption}\n{summary['model']}, r={r_that_ran(summary)}, protect={model.protect}{weights}"
    png = plan.run_dir / f"{name}.png"
    pixels = draw_grid(
        picture, maps, tokens, attention, names, note, plan.attn_block, png, title, model.regtome_num_blocks
    )
    if plan.dense_features:
        features = f"{name}: last block's patch features (PCA to RGB), r={r_that_ran(summary)}\n{summary['model']}"
        draw_dense_features(model, batch, picture, plan.run_dir / f"{name}_features.png", features)
    info = {
        "png": f"{name}.png",
        "tokens": tokens,
        "groups": groups,
        "size": list(pixels.shape[:2]),
        "true": None if target is None else _label(plan.classes, target),
        "predicted": _label(plan.classes, predicted),
        "probability": float(probabilities[predicted]),
    }
    return info, pixels
