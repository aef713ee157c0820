"""The training loop (DeiT's engine, with gradient accumulation, AMP through a GradScaler, Mixup, EMA), its stop on
a signal after the current optimizer step, and the evaluation loop of validation and task=eval."""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.utils import ModelEmaV3, unwrap_model
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..errors import NonFiniteLoss
from ..models.build import logits_of
from ..run.console import raise_interrupted, say_ending
from ..run.runtime import DistInfo, all_reduce_sum, autocast, gather_objects, synchronize
from ..run.session import Session

if TYPE_CHECKING:
    from .setup import TrainRun


class GracefulStop:
    """SIGTERM/SIGINT/SIGHUP (unless `nohup` ignores it) as a request the loop honours after the current optimizer
    step, on every rank at once. A second Ctrl-C stops at once (last.pt, written atomically, holds the last save)."""

    # SIGUSR2: submitit's warning before a SLURM time limit (it then requeues the job)
    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)  # POSIX, as the fcntl run lock is

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for signum in self.SIGNALS:
            if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
                continue  # nohup: the user asked the run to outlive its terminal
            self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            say_ending("stopped at once by a second Ctrl-C; checkpoints/last.pt holds the last save", logging.WARNING)
            os._exit(128 + signum)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def pass_on(self) -> None:
        """After last.pt is safe, let a previous handler (submitit's requeue on SLURM) act too; Python's own
        Ctrl-C handler is not one (it would raise KeyboardInterrupt and print a traceback)."""
        previous = self._previous.get(self.signum) if self.signum is not None else None
        if callable(previous) and previous not in (signal.default_int_handler, raise_interrupted):
            previous(self.signum, None)

    def requested(self, device: torch.device, info: DistInfo) -> bool:
        """True on every rank as soon as any rank got a signal (so all ranks stop at the same step)."""
        if not info.enabled:
            return self.signum is not None
        flag = torch.tensor([float(self.signum is not None)], device=device)
        return bool(all_reduce_sum(flag, info).item() > 0)


def empty_sums() -> dict[str, float]:
    return {"loss": 0.0, "correct": 0.0, "samples": 0.0}


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint as plain types."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # batches of the current epoch already trained
    num_updates: int = 0  # optimizer steps taken
    best_top1: float = -1.0  # the validation top-1 of best.pt
    epoch_sums: dict[str, float] = field(default_factory=empty_sums)  # the epoch's loss/accuracy so far
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Optimization:
    """Everything an optimizer step uses besides the model and the batch, built once per run."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm scheduler, stepped per update
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    amp_autocast: Callable[[], Any]
    mixup: Optional[Mixup] = None
    ema: Optional[ModelEmaV3] = None
    accum_steps: int = 1
    clip_grad: Optional[float] = None


def train_one_epoch(
    run: TrainRun, loader: DataLoader, stop: GracefulStop, writer: Optional[SummaryWriter], max_steps: Optional[int]
) -> dict[str, float]:
    """Train until the loader ends, `max_steps` batches, or a stop request; returns the epoch's loss, accuracy and
    images/s, and leaves its sums summed over all ranks (what a mid-epoch checkpoint saves)."""
    model, opt, state, prepare = run.model, run.opt, run.state, run.session.prepare
    device, info = run.session.device, run.session.info
    model.train()
    total = len(loader) + state.step_in_epoch
    if max_steps:
        total = min(total, max_steps)
    start, seen, sums = time.perf_counter(), 0, state.epoch_sums
    # as a context: an error (a bad image, a NaN) closes the bar before the one-line message
    with tqdm(
        total=total,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}",
        disable=not info.is_main,
        dynamic_ncols=True,
        leave=False,
    ) as bar:
        for images, targets in loader:
            step = state.step_in_epoch
            if step >= total:
                break
            images, targets = prepare(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
            update = (step + 1) % opt.accum_steps == 0 or step + 1 == total
            loss_value = train_step(model, images, targets, opt, state, update)
            seen += len(targets)
            rate = seen * info.world_size / (time.perf_counter() - start)
            lr = opt.optimizer.param_groups[0]["lr"]
            bar.update(1)
            bar.set_postfix(
                loss=f"{sums['loss'] / sums['samples']:.3f}",
                acc=f"{100 * sums['correct'] / sums['samples']:.1f}",
                lr=f"{lr:.2e}",
                img_s=f"{rate:.0f}",
            )
            if writer is not None and update and state.num_updates % run.cfg.trainer.log_every == 0:
                for name, value in (("loss", loss_value), ("lr", lr), ("images_per_s", rate)):
                    writer.add_scalar(f"train/{name}", value, state.num_updates)
            if update and stop.requested(device, info):
                break
    values = all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64, device=device), info)
    state.epoch_sums = sums = dict(zip(sums, values.tolist()))  # over all ranks
    return {
        "train_loss": sums["loss"] / max(sums["samples"], 1),
        "train_acc": 100 * sums["correct"] / max(sums["samples"], 1),
        "train_images_per_s": seen * info.world_size / max(time.perf_counter() - start, 1e-9),
    }


def train_step(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, opt: Optimization, state: TrainState, update: bool
) -> float:
    """Forward and backward of one batch (an optimizer step when `update`); adds to the epoch's sums."""
    hard_targets = targets
    if opt.mixup is not None:
        images, targets = opt.mixup(images, targets)
    # DDP's no_sync before the last batch of an accumulation window: gradients add up on each rank, and the last
    # backward averages the sum across ranks once per optimizer step (torch.compile wraps the DDP module)
    ddp = getattr(model, "_orig_mod", model)
    with ddp.no_sync() if not update and isinstance(ddp, DistributedDataParallel) else nullcontext():
        with opt.amp_autocast():
            logits = logits_of(model(images))
            loss = opt.loss_fn(logits, targets)
        loss_value = loss.item()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(
                f"loss is {loss_value} at epoch {state.epoch + 1} step {state.step_in_epoch + 1}; "
                "stopped without saving, last.pt and best.pt are the last good state (lower trainer.lr "
                "or use trainer.clip_grad)"
            )
        opt.scaler.scale(loss / opt.accum_steps).backward()
    if update:
        optimizer_step(model, opt, state)
    sums, batch = state.epoch_sums, len(hard_targets)
    sums["loss"] += loss_value * batch
    sums["correct"] += (top_classes(logits.detach().float(), k=1)[:, 0] == hard_targets).sum().item()
    sums["samples"] += batch
    state.step_in_epoch += 1
    return loss_value


def optimizer_step(model: nn.Module, opt: Optimization, state: TrainState) -> None:
    if opt.clip_grad:
        opt.scaler.unscale_(opt.optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    state.num_updates += 1
    opt.scheduler.step_update(num_updates=state.num_updates)
    if opt.ema is not None:
        opt.ema.update(unwrap_model(model), step=state.num_updates)  # torch.compile's and DDP's wrappers off


def top_classes(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(B, min(k, classes)) class indices, highest logit first: the one accuracy rule of training, validation
    and evaluation (column 0 is the prediction; top-k counts a target anywhere in the row). Equal logits rank
    the lower class index first, on every CPU (a stable sort; topk's order among ties is unspecified)."""
    return logits.sort(dim=-1, descending=True, stable=True).indices[:, : min(k, logits.shape[-1])]


def eval_loader(dataset: Dataset, session: Session) -> DataLoader:
    """The loader of an evaluation, in order: rank r gets samples r, r + W, r + 2W, ... (no padding: none twice)."""
    info = session.info
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size)) if info.enabled else dataset
    return session.loader(shard, batch_size=session.eval_batch_size, shuffle=False)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, session: Session, desc: str = "eval", predictions: list[tuple] | None = None
) -> dict[str, Any]:
    """Loss, top-1, top-5 and model images/s over the loader (all ranks). With `predictions` (a list), rank 0
    gets one (index, target, pred, correct, prob) row per sample, in data set order. The first batch of each
    shape is left out of the timing when a later batch is timed: its call includes warm-up, and under
    runtime.compile the compilation (minutes on a CPU)."""
    device, dtype, info, prepare = session.device, session.dtype, session.info, session.prepare
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, samples
    rows: list[torch.Tensor] = []  # (target, pred, prob) per sample
    shapes: set[torch.Size] = set()
    first, later = [0, 0.0], [0, 0.0]  # (samples, seconds) of the first batch of each shape, and of the others
    with tqdm(loader, desc=desc, disable=not info.is_main, leave=False, dynamic_ncols=True) as batches:
        for images, targets in batches:
            images, targets = prepare(images.to(device, non_blocking=True)), targets.to(device, non_blocking=True)
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, dtype):
                logits = logits_of(model(images))
            synchronize(device)
            timed = later if images.shape in shapes else first
            timed[0], timed[1] = timed[0] + len(images), timed[1] + time.perf_counter() - start
            shapes.add(images.shape)
            logits = logits.float()
            top5 = top_classes(logits)
            hits = top5 == targets[:, None]
            totals[0] += F.cross_entropy(logits, targets, reduction="sum").double()
            totals[1] += hits[:, 0].sum()
            totals[2] += hits.any(dim=-1).sum()
            totals[3] += len(targets)
            if predictions is not None:
                prob = logits.softmax(dim=-1).max(dim=-1).values
                rows.append(torch.stack([targets.double(), top5[:, 0].double(), prob.double()], dim=1).cpu())
    timed = later if later[0] else first  # every batch the first of its shape: time them all
    totals = torch.cat([totals, torch.tensor(timed, dtype=torch.float64, device=device)])
    loss_sum, top1, top5_sum, count, timed_samples, seconds = all_reduce_sum(totals, info).tolist()
    if predictions is not None:  # every rank's rows, in data set order (rank r holds samples r, r + W, ...)
        shards = gather_objects(torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64), info)
        predictions.extend(
            sorted(
                (rank + i * len(shards), int(target), int(pred), int(target == pred), prob)
                for rank, part in enumerate(shards)
                for i, (target, pred, prob) in enumerate(part.tolist())
            )
        )
    count = max(count, 1)
    return {
        "loss": loss_sum / count,
        "top1": 100 * top1 / count,
        "top5": 100 * top5_sum / count,
        "samples": int(count),
        "images_per_s": timed_samples / max(seconds / info.world_size, 1e-9),
    }
