"""results.json: what a run measured, with everything needed to compare it to another run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import timm
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

import regtome

from ..models.build import model_label
from .atomic import atomic_write
from .runtime import device_name, dtype_name


def merge_summary(model: nn.Module, img_size: int) -> dict[str, Any]:
    """GFLOPs per image, tokens left and r applied in each block at the model's own options (counted, not
    whatever its last forward happened to be)."""
    counts = regtome.token_counts(model, (3, img_size, img_size))
    return {
        "gflops": regtome.vit_flops(model, (3, img_size, img_size)),
        "tokens_per_block": counts.after,
        "r_per_block": counts.r,
        "r_requested_per_block": counts.r_requested,
    }


def run_record(
    cfg: DictConfig,
    model: nn.Module,
    metrics: Mapping[str, Any],
    device: torch.device,
    dtype: Optional[torch.dtype],
    batch_size: int,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    record = {
        "task": cfg.task,
        "dataset": cfg.dataset.name,
        "data_root": OmegaConf.select(cfg, "dataset.root", default=None, throw_on_missing=False),
        "model": model_label(model_cfg),
        "model_name": model_cfg["name"],
        "model_kwargs": model_cfg.get("kwargs") or {},
        "img_size": model_cfg["img_size"],
        "registers": regtome.prefix_layout(model).num_register,
        "r": list(model.r) if isinstance(model.r, tuple) else model.r,  # what ran (tome.flops chooses it)
        "flops_fraction": OmegaConf.select(cfg, "tome.flops", default=None),
        "protect": model.protect,
        "prop_attn": model.prop_attn,
        "top1": metrics.get("top1", metrics.get("val_top1")),
        "top5": metrics.get("top5", metrics.get("val_top5")),
        "images_per_s": metrics.get("images_per_s", metrics.get("val_images_per_s")),
        "batch_size": batch_size,
        "dtype": dtype_name(dtype),
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        **merge_summary(model, int(cfg.model.img_size)),
        "metrics": dict(metrics),
    }
    return record | dict(extra or {})


def write_results(run_dir: str | os.PathLike, record: Mapping[str, Any], name: str = "results.json") -> Path:
    text = json.dumps(record, indent=2, default=str) + "\n"
    return atomic_write(Path(run_dir) / name, lambda f: f.write(text), text=True)
