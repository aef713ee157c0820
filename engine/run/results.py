"""results.json: what a run measured, and what it takes to compare it to another run, the same for every task:
the merging that ran (`merge_record`), the preprocessing (`data.preprocessing`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import timm
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

import regtome
from data import preprocessing

from ..models.build import model_label
from ..models.tome_group import compact
from .folder_claim import atomic_write
from .runtime import device_name, dtype_name
from .session import Session


def merge_record(model: nn.Module, input_size: Sequence[int]) -> dict[str, Any]:
    """The merging that runs, counted at the model's own options (not whatever its last forward happened to be):
    r as set (what tome.flops chose, when it chose), r applied and asked in each block (the cap may lower it),
    tokens left after each block, GFLOPs per image. Every task's record and result line read it."""
    size = tuple(int(s) for s in input_size)
    counts = regtome.token_counts(model, size)
    return {
        "r": list(model.r) if isinstance(model.r, tuple) else model.r,
        "r_per_block": counts.r,
        "r_requested_per_block": counts.r_requested,
        "tokens_per_block": counts.after,
        "gflops": regtome.vit_flops(model, size),
        "protect": model.protect,
    }


def r_that_ran(merge: Mapping[str, Any]) -> str:
    """The r of a `merge_record` for a result line: as set, or where the cap lowered it, r applied per block."""
    if merge["r_per_block"] == merge["r_requested_per_block"]:
        return compact(merge["r"])
    return f"{compact(merge['r_per_block'])} (capped; asked {compact(merge['r'])})"


def run_record(
    cfg: DictConfig,
    session: Session,
    metrics: Mapping[str, Any],
    batch_size: int,
    extra: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """results.json of a training or an evaluation: what ran, on what, how it was measured, and `metrics`."""
    model, inputs = session.model, session.inputs
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    return {
        "task": cfg.task,
        "dataset": cfg.dataset.name,
        "data_root": OmegaConf.select(cfg, "dataset.root", default=None, throw_on_missing=False),
        "model": model_label(model_cfg),
        "model_name": model_cfg["name"],
        "model_kwargs": model_cfg.get("kwargs") or {},
        "img_size": model_cfg["img_size"],
        "registers": regtome.prefix_layout(model).num_register,
        **merge_record(model, inputs["input_size"]),
        "flops_fraction": OmegaConf.select(cfg, "tome.flops", default=None),
        "prop_attn": model.prop_attn,
        "top1": metrics.get("top1", metrics.get("val_top1")),
        "top5": metrics.get("top5", metrics.get("val_top5")),
        "images_per_s": metrics.get("images_per_s", metrics.get("val_images_per_s")),
        "batch_size": batch_size,
        "dtype": dtype_name(session.dtype),
        "device": device_name(session.device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "preprocessing": preprocessing(cfg.dataset, inputs),
        "metrics": dict(metrics),
        **(extra or {}),
    }


def write_results(run_dir: str | os.PathLike, record: Mapping[str, Any], name: str = "results.json") -> Path:
    text = json.dumps(record, indent=2, default=str) + "\n"
    return atomic_write(Path(run_dir) / name, lambda f: f.write(text), text=True)
