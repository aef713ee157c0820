"""Training: the loop (`train_one_epoch`), and `run`, which sets it up, validates and checkpoints.

Fault tolerance: checkpoints are atomic; SIGTERM/SIGINT stop after the current optimizer step
with `last.pt` written; a NaN/inf loss stops before anything is written; resume restores model,
optimizer, scheduler, scaler, EMA, RNG states and the position inside the epoch, so a resumed run
ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from data import build_datasets

from .checkpoint import atomic_save, check_same_architecture, load_checkpoint, load_weights
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from .errors import UserError
from .evaluate import eval_loader, evaluate
from .model import build_model, data_config
from .overrides import apply_overrides
from .results import run_record, write_results
from .runtime import amp_dtype, autocast, resolve_device, rng_state, seed_everything, set_rng_state


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; last.pt holds the state to resume from."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteLoss(UserError):
    pass


class GracefulStop:
    """Turn SIGTERM/SIGINT into a request that the loop honours after the current optimizer step."""

    # SIGUSR2: submitit's warning before a SLURM time limit (it then requeues the job)
    SIGNALS = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGUSR2,) if hasattr(signal, "SIGUSR2") else ())

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def pass_on(self) -> None:
        """After last.pt is safe, let a previous handler (submitit's requeue on SLURM) act too."""
        previous = self._previous.get(self.signum)
        if callable(previous):
            previous(self.signum, None)


def empty_sums() -> dict[str, float]:
    """Running training loss/accuracy sums of the current epoch."""
    return {"loss": 0.0, "correct": 0.0, "samples": 0.0}


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint as plain types."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # batches of the current epoch already trained
    num_updates: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    epoch_sums: dict[str, float] = field(default_factory=empty_sums)
    history: list[dict[str, float]] = field(default_factory=list)


class ResumableSampler(Sampler[int]):
    """DistributedSampler (shuffled per epoch with set_epoch) that can skip the batches already done."""

    def __init__(self, sampler: DistributedSampler, skip: int = 0) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.sampler)[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


@dataclass
class Trainer:
    """What one training step needs, built once by `run`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    mixup: Optional[Mixup]
    ema: Optional[ModelEmaV3]
    device: torch.device
    dtype: Optional[torch.dtype]
    info: DistInfo
    accum_steps: int
    clip_grad: Optional[float]
    writer: Optional[SummaryWriter]
    log_every: int


def train_one_epoch(t: Trainer, loader: DataLoader, state: TrainState, stop: GracefulStop,
                    max_steps: Optional[int]) -> float:
    """Train until the loader ends (or a stop request); returns images/s of this call."""
    t.model.train()
    total = len(loader) + state.step_in_epoch
    if max_steps:
        total = min(total, max_steps)
    bar = tqdm(total=total, initial=state.step_in_epoch, desc=f"epoch {state.epoch}", disable=not t.info.is_main,
               dynamic_ncols=True)
    start, seen = time.perf_counter(), 0
    sums = state.epoch_sums
    for images, targets in loader:
        step = state.step_in_epoch
        if step >= total:
            break
        images, targets = images.to(t.device, non_blocking=True), targets.to(t.device, non_blocking=True)
        hard_targets = targets
        if t.mixup is not None:
            images, targets = t.mixup(images, targets)
        with autocast(t.device, t.dtype):
            logits = t.model(images)
            loss = t.loss_fn(logits, targets)
        loss_value = loss.item()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss_value} at epoch {state.epoch} step {step}; stopped without saving, "
                                "last.pt and best.pt are the last good state (lower trainer.lr or use trainer.clip_grad)")
        t.scaler.scale(loss / t.accum_steps).backward()

        update = (step + 1) % t.accum_steps == 0 or step + 1 == total
        if update:
            if t.clip_grad:
                t.scaler.unscale_(t.optimizer)
                nn.utils.clip_grad_norm_(t.model.parameters(), t.clip_grad)
            t.scaler.step(t.optimizer)
            t.scaler.update()
            t.optimizer.zero_grad(set_to_none=True)
            state.num_updates += 1
            t.scheduler.step_update(num_updates=state.num_updates)
            if t.ema is not None:
                t.ema.update(_unwrap(t.model), step=state.num_updates)

        batch = len(hard_targets)
        sums["loss"] += loss_value * batch
        sums["correct"] += (logits.argmax(-1) == hard_targets).sum().item()
        sums["samples"] += batch
        state.step_in_epoch, seen = step + 1, seen + batch
        lr = t.optimizer.param_groups[0]["lr"]
        rate = seen / (time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss'] / sums['samples']:.3f}",
                        acc=f"{100 * sums['correct'] / sums['samples']:.1f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        if t.writer is not None and state.num_updates % t.log_every == 0 and update:
            t.writer.add_scalar("train/loss", loss_value, state.num_updates)
            t.writer.add_scalar("train/lr", lr, state.num_updates)
            t.writer.add_scalar("train/images_per_s", rate * t.info.world_size, state.num_updates)
        if update and _stop_requested(stop, t):
            break
    bar.close()
    return seen * t.info.world_size / max(time.perf_counter() - start, 1e-9)


def _stop_requested(stop: GracefulStop, t: Trainer) -> bool:
    """True on every rank as soon as any rank got a signal (so all ranks stop at the same step)."""
    flag = torch.tensor([float(stop.signum is not None)], device=t.device)
    return bool(all_reduce_sum(flag, t.info).item() > 0)


def _global_sums(sums: dict[str, float], t: Trainer) -> dict[str, float]:
    """Training loss/accuracy sums over all ranks."""
    values = all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64, device=t.device), t.info)
    return dict(zip(sums, values.tolist()))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _checkpoint(t: Trainer, state: TrainState, cfg: DictConfig) -> dict[str, Any]:
    return {
        "model": _unwrap(t.model).state_dict(),
        "ema": t.ema.module.state_dict() if t.ema is not None else None,
        "optimizer": t.optimizer.state_dict(),
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict(),
        "state": asdict(state),
        "rng": rng_state(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _restore(t: Trainer, checkpoint: dict[str, Any], path: Path, epochs: int) -> TrainState:
    load_weights(_unwrap(t.model), checkpoint["model"], path)
    if t.ema is not None and checkpoint.get("ema") is not None:
        t.ema.module.load_state_dict(checkpoint["ema"])
    t.optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["config"]["trainer"]["epochs"] == epochs:
        t.scheduler.load_state_dict(checkpoint["scheduler"])
    # else: the run was extended (trainer.epochs changed); keep the schedule built for the new length
    t.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    state = TrainState(**checkpoint["state"])
    t.scheduler.step_update(num_updates=state.num_updates)
    return state


def resumed_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> tuple[DictConfig, Optional[dict]]:
    """With resume=true (or in a SLURM job requeued after a preemption or time-out), continue from
    run_dir's last.pt under its saved config.

    Only `trainer.*` settings given on this command line (epochs, device, workers) replace the saved ones.
    """
    last = run_dir / "checkpoints" / "last.pt"
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and last.exists()
    if not (cfg.resume or requeued):
        return cfg, None
    if not last.exists():
        raise UserError(f"resume=true but {last} does not exist; pass hydra.run.dir=RUN_DIR of the run to continue")
    checkpoint = load_checkpoint(last)
    resumed = apply_overrides(OmegaConf.create(checkpoint["config"]), cfg, overrides, groups=("trainer",))
    resumed.resume = True
    return resumed, checkpoint


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    cfg, checkpoint = resumed_config(cfg, run_dir, overrides)
    tc = cfg.trainer
    info = init_distributed(use_cuda=tc.device != "cpu" and torch.cuda.is_available())
    device = resolve_device(tc.device, info.local_rank)
    dtype = amp_dtype(tc.amp, device, tc.device)
    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)

    num_classes = cfg.dataset.num_classes
    model = build_model(cfg.model, cfg.tome, num_classes or 1000)
    splits = build_datasets(cfg.dataset, data_config(model, cfg.model, cfg.dataset), augment=tc.augment,
                            seed=cfg.seed)
    if num_classes is None:  # imagefolder: counted from the class folders
        num_classes = len(splits["train"].classes)
        cfg.dataset.num_classes = num_classes
        model = build_model(cfg.model, cfg.tome, num_classes)
    if cfg.ckpt and checkpoint is None:  # fine-tune from a RegToMe checkpoint
        init = load_checkpoint(cfg.ckpt)
        check_same_architecture(init["config"]["model"], OmegaConf.to_container(cfg.model, resolve=True), cfg.ckpt)
        load_weights(model, init["model"], cfg.ckpt)
    model.to(device)

    mixup_active = tc.mixup > 0 or tc.cutmix > 0
    sampler = DistributedSampler(splits["train"], num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=mixup_active)
    updates_per_epoch = -(-len(sampler) // tc.batch_size // tc.accum_steps)
    if tc.max_steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, -(-tc.max_steps_per_epoch // tc.accum_steps))
    optimizer = create_optimizer_v2(model, opt=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=tc.epochs, warmup_epochs=tc.warmup_epochs,
                                       warmup_lr=tc.warmup_lr, min_lr=tc.min_lr, step_on_epochs=False,
                                       updates_per_epoch=max(updates_per_epoch, 1))
    trainer = Trainer(
        model=DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if info.enabled else model,
        optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        loss_fn=SoftTargetCrossEntropy() if mixup_active else nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing),
        mixup=Mixup(mixup_alpha=tc.mixup, cutmix_alpha=tc.cutmix, label_smoothing=tc.label_smoothing,
                    num_classes=num_classes) if mixup_active else None,
        ema=ModelEmaV3(model, decay=tc.ema_decay) if tc.ema else None,
        device=device, dtype=dtype, info=info, accum_steps=tc.accum_steps, clip_grad=tc.clip_grad,
        writer=SummaryWriter(str(run_dir / "tensorboard")) if info.is_main else None, log_every=tc.log_every,
    )
    ckpt_dir = run_dir / "checkpoints"
    state = _restore(trainer, checkpoint, ckpt_dir / "last.pt", tc.epochs) if checkpoint else TrainState()
    if info.rank > 0:  # a mid-epoch checkpoint holds the sums of all ranks: count them once, on rank 0
        state.epoch_sums = empty_sums()
    val_loader = eval_loader(splits["val"], tc.eval_batch_size, tc.num_workers, info)
    metrics: dict[str, Any] = state.history[-1] if state.history else {}

    epochs_this_run = 0
    with GracefulStop() as stop:
        for epoch in range(state.epoch, tc.epochs):
            sampler.set_epoch(epoch)
            # Its own generator: a loader drawing worker seeds from the global RNG would shift the
            # RNG stream of a run resumed mid-epoch.
            loader = DataLoader(splits["train"], batch_size=tc.batch_size, drop_last=mixup_active,
                                sampler=ResumableSampler(sampler, skip=state.step_in_epoch * tc.batch_size),
                                num_workers=tc.num_workers, pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch + info.rank))
            train_rate = train_one_epoch(trainer, loader, state, stop, tc.max_steps_per_epoch)
            state.epoch_sums = _global_sums(state.epoch_sums, trainer)
            if stop.signum is not None:
                _save(trainer, state, cfg, ckpt_dir, best=False)
                name = signal.Signals(stop.signum).name
                stop.pass_on()
                raise TrainingInterrupted(stop.signum, (
                    f"stopped by {name} at epoch {state.epoch} step {state.step_in_epoch}; state saved in "
                    f"{ckpt_dir / 'last.pt'}; continue with: python main.py task=train hydra.run.dir={run_dir} resume=true"))
            sums = state.epoch_sums
            metrics = {"epoch": epoch + 1, "train_loss": sums["loss"] / max(sums["samples"], 1),
                       "train_acc": 100 * sums["correct"] / max(sums["samples"], 1), "train_images_per_s": train_rate}
            state.epoch, state.step_in_epoch = epoch + 1, 0
            state.epoch_sums = empty_sums()
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
                eval_model = trainer.ema.module if trainer.ema is not None else _unwrap(trainer.model)
                val = evaluate(eval_model, val_loader, device, dtype, info, desc="val")
                metrics |= {f"val_{k}": v for k, v in val.items()}
            state.history.append(metrics)
            _log_epoch(trainer.writer, metrics)
            is_best = metrics.get("val_top1", -1.0) > state.best_top1
            state.best_top1 = max(state.best_top1, metrics.get("val_top1", -1.0))
            _save(trainer, state, cfg, ckpt_dir, best=is_best)
            epochs_this_run += 1
            if tc.stop_after_epochs and epochs_this_run >= tc.stop_after_epochs and state.epoch < tc.epochs:
                if info.is_main:
                    print(f"stopping after {epochs_this_run} epochs (trainer.stop_after_epochs); continue with: "
                          f"python main.py task=train hydra.run.dir={run_dir} resume=true")
                break

    if trainer.writer is not None:
        trainer.writer.close()
    record = run_record(cfg, _unwrap(trainer.model), metrics, device, dtype, tc.batch_size,
                        extra={"epochs": state.epoch, "history": state.history,
                               "checkpoint": str(ckpt_dir / "best.pt")})
    if info.is_main:
        write_results(run_dir, record)
    return record


def _save(t: Trainer, state: TrainState, cfg: DictConfig, ckpt_dir: Path, best: bool) -> None:
    if t.info.is_main:
        checkpoint = _checkpoint(t, state, cfg)
        atomic_save(checkpoint, ckpt_dir / "last.pt")
        if best:
            atomic_save(checkpoint, ckpt_dir / "best.pt")
    barrier(t.info)


def _log_epoch(writer: Optional[SummaryWriter], metrics: dict[str, float]) -> None:
    if writer is None:
        return
    for key, value in metrics.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(f"epoch/{key}", value, metrics["epoch"])
    writer.flush()
