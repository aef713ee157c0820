"""Evaluation: top-1/top-5, loss and model images/s, counting every sample once under DDP."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from data import build_datasets

from .checkpoint import load_weights
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .errors import UserError
from .model import build_model, config_from_checkpoint, data_config
from .results import run_record, write_results
from .runtime import amp_dtype, autocast, resolve_device, synchronize


def shard(dataset: Dataset, info: DistInfo) -> Dataset:
    """Rank r gets samples r, r + W, r + 2W, ...: no padding, so nothing is counted twice."""
    return Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.enabled else dataset


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, info: DistInfo) -> DataLoader:
    return DataLoader(shard(dataset, info), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, dtype: Optional[torch.dtype],
             info: DistInfo, desc: str = "eval") -> dict[str, Any]:
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, samples
    model_seconds = 0.0
    for images, targets in tqdm(loader, desc=desc, disable=not info.is_main, leave=False, dynamic_ncols=True):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            logits = model(images)
        synchronize(device)
        model_seconds += time.perf_counter() - start
        top5 = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top5 == targets[:, None]
        totals += torch.stack([
            F.cross_entropy(logits.float(), targets, reduction="sum").double(),
            hits[:, 0].sum().double(), hits.any(dim=-1).sum().double(), torch.tensor(len(targets), device=device).double(),
        ])
    loss_sum, top1, top5, count = all_reduce_sum(totals, info).tolist()
    seconds = all_reduce_sum(torch.tensor([model_seconds], device=device, dtype=torch.float64), info).item()
    count = max(count, 1)
    return {"loss": loss_sum / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count,
            "samples": int(count), "images_per_s": count / max(seconds / info.world_size, 1e-9)}


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """task=eval: accuracy and images/s of a checkpoint (rebuilt from its saved config) or of timm weights."""
    info = init_distributed(use_cuda=cfg.trainer.device != "cpu" and torch.cuda.is_available())
    device = resolve_device(cfg.trainer.device, info.local_rank)
    dtype = amp_dtype(cfg.trainer.amp, device, cfg.trainer.device)
    cfg, weights = config_from_checkpoint(cfg, overrides)
    if weights is None and not (cfg.model.pretrained or cfg.model.pretrained_file):
        raise UserError("task=eval needs weights: ckpt=PATH, model.pretrained=true or model.pretrained_file=PATH")

    model = build_model(cfg.model, cfg.tome, cfg.dataset.num_classes or 1000)
    if weights is not None:
        load_weights(model, weights, cfg.ckpt)
    model.to(device)
    dataset = build_datasets(cfg.dataset, data_config(model, cfg.model, cfg.dataset), augment=False,
                             splits=("val",), seed=cfg.seed)["val"]
    loader = eval_loader(dataset, cfg.trainer.eval_batch_size, cfg.trainer.num_workers, info)
    metrics = evaluate(model, loader, device, dtype, info)
    record = run_record(cfg, model, metrics, device, dtype, cfg.trainer.eval_batch_size,
                        extra={"checkpoint": cfg.ckpt, "world_size": info.world_size})
    if info.is_main:
        write_results(run_dir, record)
        print(f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  {metrics['images_per_s']:.1f} img/s  "
              f"{record['gflops']:.2f} GFLOPs  r={record['r']}  -> {run_dir / 'results.json'}")
    return record
