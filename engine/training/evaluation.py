"""The evaluation loop: top-1/top-5, loss and model images/s, counting every sample once under DDP, and
per-sample predictions in data set order. Used by task=eval and by validation during training."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from data.workers import ignore_interrupts

from ..models.build import logits_of
from ..run.runtime import DistInfo, all_reduce_sum, autocast, gather_objects, synchronize
from ..run.session import Session


def top_classes(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(B, min(k, classes)) class indices, highest logit first: the one accuracy rule of training, validation
    and evaluation (column 0 is the prediction; top-k counts a target anywhere in the row). Equal logits rank
    the lower class index first, on every CPU (a stable sort; topk's order among ties is unspecified)."""
    return logits.sort(dim=-1, descending=True, stable=True).indices[:, : min(k, logits.shape[-1])]


def eval_loader(dataset: Dataset, session: Session) -> DataLoader:
    """The loader of an evaluation, in order: rank r gets samples r, r + W, r + 2W, ... (no padding, so nothing
    is counted twice)."""
    info = session.info
    return DataLoader(
        Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.enabled else dataset,
        batch_size=session.eval_batch_size,
        shuffle=False,
        num_workers=session.workers,
        pin_memory=session.pin_memory,
        worker_init_fn=ignore_interrupts,  # Ctrl-C is the main process's to handle
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dtype: Optional[torch.dtype],
    info: DistInfo,
    prepare: Callable[[torch.Tensor], torch.Tensor] = nn.Identity(),
    desc: str = "eval",
    predictions: Optional[list[tuple]] = None,
) -> dict[str, Any]:
    """Loss, top-1, top-5 and model images/s over the loader (all ranks). With `predictions` (a list), rank 0
    gets one (index, target, pred, correct, prob) row per sample, in data set order."""
    model.eval()
    with tqdm(loader, desc=desc, disable=not info.is_main, leave=False, dynamic_ncols=True) as batches:
        totals, rows, timed = _run_batches(model, batches, device, dtype, prepare, predictions is not None)
    loss_sum, top1, top5, count = all_reduce_sum(totals, info).tolist()
    timed = all_reduce_sum(torch.tensor(timed, device=device, dtype=torch.float64), info).tolist()
    if predictions is not None:
        predictions.extend(_gather_in_order(rows, info))
    count = max(count, 1)
    return {
        "loss": loss_sum / count,
        "top1": 100 * top1 / count,
        "top5": 100 * top5 / count,
        "samples": int(count),
        "images_per_s": timed[0] / max(timed[1] / info.world_size, 1e-9),
    }


def _run_batches(
    model: nn.Module,
    batches: Any,
    device: torch.device,
    dtype: Optional[torch.dtype],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    keep_rows: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """Sums (loss, top-1, top-5, samples), per-sample (target, pred, prob) rows, and (samples, seconds) in the
    model. The first batch of each shape is left out of the timing when a later batch is timed: its call
    includes warm-up, and under runtime.compile the compilation (minutes on a CPU)."""
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    rows: list[torch.Tensor] = []
    first_of_shape: dict[tuple, tuple[int, float]] = {}
    samples, model_seconds = 0, 0.0
    for images, targets in batches:
        images, targets = prepare(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, dtype):
            logits = logits_of(model(images))
        synchronize(device)
        if tuple(images.shape) in first_of_shape:
            samples, model_seconds = samples + len(images), model_seconds + time.perf_counter() - start
        else:
            first_of_shape[tuple(images.shape)] = (len(images), time.perf_counter() - start)
        logits = logits.float()
        top5 = top_classes(logits)
        hits = top5 == targets[:, None]
        totals += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="sum").double(),
                hits[:, 0].sum().double(),
                hits.any(dim=-1).sum().double(),
                torch.tensor(len(targets), device=device).double(),
            ]
        )
        if keep_rows:
            prob = logits.softmax(dim=-1).max(dim=-1).values
            rows.append(torch.stack([targets.double(), top5[:, 0].double(), prob.double()], dim=1).cpu())
    if samples == 0:  # every batch was the first of its shape: time them all
        samples, model_seconds = (sum(v) for v in zip(*first_of_shape.values())) if first_of_shape else (0, 0.0)
    return totals, rows, [float(samples), model_seconds]


def _gather_in_order(rows: list[torch.Tensor], info: DistInfo) -> list[tuple]:
    """Per-sample rows of every rank, in data set order (rank r holds samples r, r + W, ...)."""
    shards = gather_objects(torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64), info)
    return sorted(
        (rank + i * len(shards), int(target), int(pred), int(target == pred), prob)
        for rank, part in enumerate(shards)
        for i, (target, pred, prob) in enumerate(part.tolist())
    )
