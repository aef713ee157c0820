"""task=train: `run` sets a training run up, then `train_one_epoch` is the loop.

Fault tolerance: checkpoints are atomic; SIGTERM/SIGINT stop after the current optimizer step
with `last.pt` written; a NaN/inf loss stops before anything is written; resume restores model,
optimizer, scheduler, scaler, EMA, RNG states and the position inside the epoch, and each
sample's augmentation is seeded by (seed, epoch, sample), so a resumed run ends with the same
weights as an uninterrupted one, whatever the number of loader workers.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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

from data import EpochSeeded, build_datasets, count_classes, input_transform

from .checkpoint import atomic_save, check_same_architecture, load_checkpoint, load_weights
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from .errors import NonFiniteLoss, TrainingInterrupted, UserError
from .evaluate import eval_loader, evaluate
from .model import build_model, data_config, model_label, report_capped_r
from .overrides import apply_overrides
from .results import run_record, write_results
from .runtime import amp_dtype, autocast, resolve_device, rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)
Batch = Callable[[torch.Tensor], torch.Tensor]


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
    best_top1: float = -1.0  # the validation top-1 of best.pt
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
class Optimization:
    """Everything an optimizer step uses besides the model and the batch, built once by `run`."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm scheduler, stepped per update
    scaler: torch.amp.GradScaler
    loss_fn: nn.Module
    amp_autocast: Callable[[], Any]
    mixup: Optional[Mixup] = None
    ema: Optional[ModelEmaV3] = None
    accum_steps: int = 1
    clip_grad: Optional[float] = None


def train_one_epoch(model: nn.Module, loader: DataLoader, prepare: Batch, opt: Optimization, state: TrainState,
                    device: torch.device, info: DistInfo, stop: GracefulStop, max_steps: Optional[int] = None,
                    writer: Optional[SummaryWriter] = None, log_every: int = 20) -> float:
    """Train until the loader ends, `max_steps` batches, or a stop request; returns images/s."""
    model.train()
    total = len(loader) + state.step_in_epoch
    if max_steps:
        total = min(total, max_steps)
    start, seen, sums = time.perf_counter(), 0, state.epoch_sums
    # as a context: an error (a bad image, a NaN) closes the bar before the one-line message
    with tqdm(total=total, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}", disable=not info.is_main,
              dynamic_ncols=True, leave=False) as bar:
        for images, targets in loader:
            step = state.step_in_epoch
            if step >= total:
                break
            images = prepare(images.to(device, non_blocking=True))
            targets = hard_targets = targets.to(device, non_blocking=True)
            if opt.mixup is not None:
                images, targets = opt.mixup(images, targets)
            with opt.amp_autocast():
                logits = model(images)
                loss = opt.loss_fn(logits, targets)
            loss_value = loss.item()
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss_value} at epoch {state.epoch} step {step}; stopped without saving, "
                                    "last.pt and best.pt are the last good state (lower trainer.lr or use trainer.clip_grad)")
            opt.scaler.scale(loss / opt.accum_steps).backward()

            update = (step + 1) % opt.accum_steps == 0 or step + 1 == total
            if update:
                optimizer_step(model, opt, state)

            batch = len(hard_targets)
            sums["loss"] += loss_value * batch
            sums["correct"] += (logits.argmax(-1) == hard_targets).sum().item()
            sums["samples"] += batch
            state.step_in_epoch, seen = step + 1, seen + batch
            rate = seen * info.world_size / (time.perf_counter() - start)
            lr = opt.optimizer.param_groups[0]["lr"]
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / sums['samples']:.3f}",
                            acc=f"{100 * sums['correct'] / sums['samples']:.1f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
            if writer is not None and update and state.num_updates % log_every == 0:
                writer.add_scalar("train/loss", loss_value, state.num_updates)
                writer.add_scalar("train/lr", lr, state.num_updates)
                writer.add_scalar("train/images_per_s", rate, state.num_updates)
            if update and _stop_requested(stop, device, info):
                break
    return seen * info.world_size / max(time.perf_counter() - start, 1e-9)


def optimizer_step(model: nn.Module, opt: Optimization, state: TrainState) -> None:
    """Unscale and clip, step (through the GradScaler), schedule, update the EMA."""
    if opt.clip_grad:
        opt.scaler.unscale_(opt.optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), opt.clip_grad)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    state.num_updates += 1
    opt.scheduler.step_update(num_updates=state.num_updates)
    if opt.ema is not None:
        opt.ema.update(_unwrap(model), step=state.num_updates)


def _stop_requested(stop: GracefulStop, device: torch.device, info: DistInfo) -> bool:
    """True on every rank as soon as any rank got a signal (so all ranks stop at the same step)."""
    if not info.enabled:
        return stop.signum is not None
    flag = torch.tensor([float(stop.signum is not None)], device=device)
    return bool(all_reduce_sum(flag, info).item() > 0)


def _global_sums(sums: dict[str, float], device: torch.device, info: DistInfo) -> dict[str, float]:
    """Training loss/accuracy sums over all ranks."""
    values = all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64, device=device), info)
    return dict(zip(sums, values.tolist()))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# --- configuration checks -------------------------------------------------------------------------

POSITIVE_INTS = ("epochs", "batch_size", "eval_batch_size", "accum_steps", "eval_every", "log_every")


def check_trainer_config(tc: DictConfig) -> None:
    """One clear line for a trainer value that cannot work."""
    for key in POSITIVE_INTS:
        value = tc[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"trainer.{key} must be an int >= 1, got {value!r}")
    if not tc.lr > 0:
        raise UserError(f"trainer.lr must be > 0, got {tc.lr!r}")
    if tc.num_workers < 0:
        raise UserError(f"trainer.num_workers must be >= 0, got {tc.num_workers!r}")
    for key in ("max_steps_per_epoch", "stop_after_epochs"):
        if tc[key] is not None and tc[key] < 1:
            raise UserError(f"trainer.{key} must be null or >= 1, got {tc[key]!r}")
    if tc.warmup_epochs < 0 or tc.mixup < 0 or tc.cutmix < 0 or tc.weight_decay < 0:
        raise UserError("trainer.warmup_epochs, mixup, cutmix and weight_decay must be >= 0")


def check_run_dir_is_free(cfg: DictConfig, ckpt_dir: Path) -> float:
    """Refuse to train a new run over another run's checkpoints, unless overwrite=true.

    Returns the top-1 that a new best.pt must beat: that of the best.pt already there, if any.
    """
    existing = sorted(p.name for p in ckpt_dir.glob("*.pt")) if ckpt_dir.is_dir() else []
    if not existing:
        return -1.0
    if not cfg.overwrite:
        raise UserError(f"{ckpt_dir.parent} already holds a run's checkpoints ({', '.join(existing)}); continue it "
                        "with resume=true, or train into another folder (drop hydra.run.dir); overwrite=true trains "
                        "a new run there")
    best = ckpt_dir / "best.pt"
    floor = float(load_checkpoint(best)["state"]["best_top1"]) if best.exists() else -1.0
    log.warning("overwrite=true: training a new run in %s; best.pt (top-1 %.2f) is replaced only by a better one",
                ckpt_dir.parent, floor)
    return floor


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


# --- checkpoints ----------------------------------------------------------------------------------

def _checkpoint(model: nn.Module, opt: Optimization, state: TrainState, cfg: DictConfig) -> dict[str, Any]:
    return {
        "model": _unwrap(model).state_dict(),
        "ema": opt.ema.module.state_dict() if opt.ema is not None else None,
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "scaler": opt.scaler.state_dict(),
        "state": asdict(state),
        "rng": rng_state(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def _restore(model: nn.Module, opt: Optimization, checkpoint: dict[str, Any], path: Path, epochs: int) -> TrainState:
    load_weights(_unwrap(model), checkpoint["model"], path)
    if opt.ema is not None and checkpoint.get("ema") is not None:
        opt.ema.module.load_state_dict(checkpoint["ema"])
    opt.optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["config"]["trainer"]["epochs"] == epochs:
        opt.scheduler.load_state_dict(checkpoint["scheduler"])
    # else: the run was extended (trainer.epochs changed); keep the schedule built for the new length
    opt.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])
    state = TrainState(**checkpoint["state"])
    opt.scheduler.step_update(num_updates=state.num_updates)
    return state


def _save(model: nn.Module, opt: Optimization, state: TrainState, cfg: DictConfig, ckpt_dir: Path, best: bool,
          info: DistInfo) -> None:
    if info.is_main:
        checkpoint = _checkpoint(model, opt, state, cfg)
        atomic_save(checkpoint, ckpt_dir / "last.pt")
        if best:
            atomic_save(checkpoint, ckpt_dir / "best.pt")
    barrier(info)


# --- building a run -------------------------------------------------------------------------------

def build_optimization(model: nn.Module, tc: DictConfig, num_classes: int, updates_per_epoch: int,
                       device: torch.device, dtype: Optional[torch.dtype]) -> Optimization:
    mixup_active = tc.mixup > 0 or tc.cutmix > 0
    optimizer = create_optimizer_v2(model, opt=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=tc.epochs, warmup_epochs=tc.warmup_epochs,
                                       warmup_lr=tc.warmup_lr, min_lr=tc.min_lr, step_on_epochs=False,
                                       updates_per_epoch=max(updates_per_epoch, 1))
    return Optimization(
        optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        loss_fn=SoftTargetCrossEntropy() if mixup_active else nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing),
        amp_autocast=partial(autocast, device, dtype),
        mixup=Mixup(mixup_alpha=tc.mixup, cutmix_alpha=tc.cutmix, label_smoothing=tc.label_smoothing,
                    num_classes=num_classes) if mixup_active else None,
        ema=ModelEmaV3(model, decay=tc.ema_decay) if tc.ema else None,
        accum_steps=tc.accum_steps, clip_grad=tc.clip_grad,
    )


def epoch_loader(dataset: EpochSeeded, sampler: DistributedSampler, epoch: int, state: TrainState, tc: DictConfig,
                 seed: int, device: torch.device, drop_last: bool) -> DataLoader:
    """This epoch's loader, skipping the batches a resumed run already trained."""
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)  # before the workers copy the data set
    return DataLoader(dataset, batch_size=tc.batch_size, drop_last=drop_last,
                      sampler=ResumableSampler(sampler, skip=state.step_in_epoch * tc.batch_size),
                      num_workers=tc.num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """A training run: build data, model and optimizer once; train, validate and checkpoint per epoch."""
    cfg, checkpoint = resumed_config(cfg, run_dir, overrides)
    tc = cfg.trainer
    check_trainer_config(tc)
    ckpt_dir = run_dir / "checkpoints"
    best_floor = -1.0 if checkpoint is not None else check_run_dir_is_free(cfg, ckpt_dir)
    info = init_distributed(use_cuda=tc.device != "cpu" and torch.cuda.is_available())
    device = resolve_device(tc.device, info.local_rank)
    dtype = amp_dtype(tc.amp, device)
    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)

    num_classes = count_classes(cfg.dataset)
    cfg = OmegaConf.merge(cfg, {"dataset": {"num_classes": num_classes}})  # saved with the checkpoints
    model = build_model(cfg.model, cfg.tome, num_classes)
    if cfg.ckpt and checkpoint is None:  # fine-tune from a RegToMe checkpoint
        init = load_checkpoint(cfg.ckpt)
        check_same_architecture(init["config"]["model"], OmegaConf.to_container(cfg.model, resolve=True), cfg.ckpt)
        load_weights(model, init["model"], cfg.ckpt)
    model.to(device)
    report_capped_r(model, cfg)
    inputs = data_config(model, cfg.model, cfg.dataset)
    splits = build_datasets(cfg.dataset, inputs, augment=tc.augment, seed=cfg.seed)
    prepare = input_transform(cfg.dataset, inputs)
    prepare = prepare.to(device) if prepare is not None else nn.Identity()

    drop_last = tc.mixup > 0 or tc.cutmix > 0  # mixup needs even batches
    train_set = EpochSeeded(splits["train"], cfg.seed)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=drop_last)
    updates_per_epoch = -(-len(sampler) // tc.batch_size // tc.accum_steps)
    if tc.max_steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, -(-tc.max_steps_per_epoch // tc.accum_steps))
    opt = build_optimization(model, tc, num_classes, updates_per_epoch, device, dtype)
    if info.enabled:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = _restore(model, opt, checkpoint, ckpt_dir / "last.pt", tc.epochs) if checkpoint else \
        TrainState(best_top1=best_floor)
    if info.rank > 0:  # a mid-epoch checkpoint holds the sums of all ranks: count them once, on rank 0
        state.epoch_sums = empty_sums()
    val_loader = eval_loader(splits["val"], tc.eval_batch_size, tc.num_workers, info)
    writer = SummaryWriter(str(run_dir / "tensorboard")) if info.is_main else None
    metrics: dict[str, Any] = state.history[-1] if state.history else {}
    if info.is_main:
        log.info("training %s on %s (%d train / %d val images) on %s, %s, %d epochs; run folder %s",
                 model_label(cfg.model), cfg.dataset.name, len(train_set), len(splits["val"]), device,
                 str(dtype or "fp32").replace("torch.", ""), tc.epochs, run_dir)

    epochs_this_run = 0
    with GracefulStop() as stop:
        for epoch in range(state.epoch, tc.epochs):
            started = time.perf_counter()
            loader = epoch_loader(train_set, sampler, epoch, state, tc, cfg.seed, device, drop_last)
            train_rate = train_one_epoch(model, loader, prepare, opt, state, device, info, stop,
                                         tc.max_steps_per_epoch, writer, tc.log_every)
            state.epoch_sums = _global_sums(state.epoch_sums, device, info)
            if stop.signum is not None:
                _save(model, opt, state, cfg, ckpt_dir, best=False, info=info)
                stop.pass_on()
                raise TrainingInterrupted(stop.signum, (
                    f"stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch} step {state.step_in_epoch}; "
                    f"state saved in {ckpt_dir / 'last.pt'}; continue with: "
                    f"python main.py task=train hydra.run.dir={run_dir} resume=true"))
            metrics = epoch_metrics(epoch, state, train_rate)
            state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, empty_sums()
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
                eval_model = opt.ema.module if opt.ema is not None else _unwrap(model)
                val = evaluate(eval_model, val_loader, device, dtype, info, prepare=prepare, desc="val")
                metrics |= {f"val_{k}": v for k, v in val.items()}
            metrics["seconds"] = time.perf_counter() - started
            state.history.append(metrics)
            is_best = metrics.get("val_top1", -1.0) > state.best_top1
            state.best_top1 = max(state.best_top1, metrics.get("val_top1", -1.0))
            _save(model, opt, state, cfg, ckpt_dir, best=is_best, info=info)
            if info.is_main:
                _log_epoch(writer, metrics, tc.epochs)
            epochs_this_run += 1
            if tc.stop_after_epochs and epochs_this_run >= tc.stop_after_epochs and state.epoch < tc.epochs:
                if info.is_main:
                    log.info("stopping after %d epochs (trainer.stop_after_epochs); continue with: "
                             "python main.py task=train hydra.run.dir=%s resume=true", epochs_this_run, run_dir)
                break

    if writer is not None:
        writer.close()
    record = run_record(cfg, _unwrap(model), metrics, device, dtype, tc.batch_size,
                        extra={"epochs": state.epoch, "best_top1": state.best_top1, "history": state.history,
                               "checkpoint": str(ckpt_dir / "best.pt")})
    if info.is_main:
        write_results(run_dir, record)
        best = f"best val top-1 {state.best_top1:.2f}" if state.best_top1 >= 0 else "no validation yet"
        log.info("done: %s; run folder %s", best, run_dir)
    return record


def epoch_metrics(epoch: int, state: TrainState, train_rate: float) -> dict[str, Any]:
    sums = state.epoch_sums
    return {"epoch": epoch + 1, "train_loss": sums["loss"] / max(sums["samples"], 1),
            "train_acc": 100 * sums["correct"] / max(sums["samples"], 1), "train_images_per_s": train_rate}


def _log_epoch(writer: Optional[SummaryWriter], metrics: dict[str, Any], epochs: int) -> None:
    """One line per epoch (stdout and main.log) and the epoch's scalars in TensorBoard."""
    val = f"val top-1 {metrics['val_top1']:.2f}" if "val_top1" in metrics else "val top-1 -"
    log.info("epoch %d/%d  train loss %.4f  %s  %.0f img/s  %.1f s", metrics["epoch"], epochs, metrics["train_loss"],
             val, metrics["train_images_per_s"], metrics["seconds"])
    if writer is None:
        return
    for key, value in metrics.items():
        if key != "epoch" and isinstance(value, (int, float)):
            writer.add_scalar(f"epoch/{key}", value, metrics["epoch"])
    writer.flush()
