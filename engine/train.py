"""task=train: `run` = resume config -> `build_run` -> `fit` (the epochs) -> `finish`; `train_one_epoch`
is the loop.

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
from contextlib import contextmanager
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

from data import EpochSeeded, build_datasets, class_names, count_classes

from .checkpoint import (check_same_architecture, load_checkpoint, restore_training, save_training,
                         training_checkpoint)
from .distributed import DistInfo, all_reduce_sum, barrier
from .errors import NonFiniteLoss, TrainingInterrupted, UserError
from .evaluate import eval_loader, evaluate
from .model import logits_of, model_label, saved_config, upgrade_config
from .overrides import apply_overrides
from .results import run_record, write_results
from .run_folder import append_resume
from .runtime import autocast, rng_state, set_rng_state
from .session import Session, open_session

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


@dataclass
class TrainRun:
    """A training run as `build_run` sets it up: what `fit` needs, and what `finish` reports."""

    cfg: DictConfig
    run_dir: Path
    session: Session
    model: nn.Module  # DDP-wrapped under torchrun
    train_set: EpochSeeded
    sampler: DistributedSampler
    val_loader: DataLoader
    opt: Optimization
    state: TrainState
    classes: Optional[list[str]]
    drop_last: bool

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


# --- the loop -------------------------------------------------------------------------------------

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
                logits = logits_of(model(images))
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
                for name, value in (("loss", loss_value), ("lr", lr), ("images_per_s", rate)):
                    writer.add_scalar(f"train/{name}", value, state.num_updates)
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


# --- configuration --------------------------------------------------------------------------------

POSITIVE_INTS = ("epochs", "batch_size", "accum_steps", "eval_every", "log_every")


def check_trainer_config(cfg: DictConfig) -> None:
    """One clear line for a trainer value that cannot work; a warning for one that wastes the run."""
    tc = cfg.trainer
    for key in POSITIVE_INTS:
        value = tc[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"trainer.{key} must be an int >= 1, got {value!r}")
    eval_batch = cfg.runtime.eval_batch_size
    if not isinstance(eval_batch, int) or isinstance(eval_batch, bool) or eval_batch < 1:
        raise UserError(f"runtime.eval_batch_size must be an int >= 1, got {eval_batch!r}")
    if not tc.lr > 0:
        raise UserError(f"trainer.lr must be > 0, got {tc.lr!r}")
    for key in ("max_steps_per_epoch", "stop_after_epochs"):
        if tc[key] is not None and tc[key] < 1:
            raise UserError(f"trainer.{key} must be null or >= 1, got {tc[key]!r}")
    if tc.warmup_epochs < 0 or tc.mixup < 0 or tc.cutmix < 0 or tc.weight_decay < 0:
        raise UserError("trainer.warmup_epochs, mixup, cutmix and weight_decay must be >= 0")
    if tc.warmup_epochs >= tc.epochs:
        log.warning("trainer.warmup_epochs=%s covers the whole run (trainer.epochs=%s): the learning rate never "
                    "reaches trainer.lr; lower trainer.warmup_epochs", tc.warmup_epochs, tc.epochs)


def resumed_config(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> tuple[DictConfig, Optional[dict]]:
    """With trainer.resume=true (or in a SLURM job requeued after a preemption or time-out), continue
    from run_dir's last.pt under its saved config; `trainer.*` and `runtime.*` keys given on this
    command line replace the saved ones, and resumes.yaml records them."""
    last = run_dir / "checkpoints" / "last.pt"
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and last.exists()
    if not (cfg.trainer.resume or requeued):
        return cfg, None
    if not last.exists():
        raise UserError(f"trainer.resume=true but {last} does not exist; pass hydra.run.dir=RUN_DIR of the run to continue")
    checkpoint = load_checkpoint(last)
    saved = saved_config(checkpoint, last)
    resumed = apply_overrides(saved, cfg, overrides, groups=("trainer", "runtime"))
    resumed.trainer.resume = True
    if int(os.environ.get("RANK", "0")) == 0:
        kept = [o for o in overrides if o.lstrip("+~").split(".", 1)[0] in ("trainer", "runtime")]
        append_resume(run_dir, kept, checkpoint["state"]["epoch"], checkpoint["state"]["step_in_epoch"])
    return resumed, checkpoint


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


def initial_weights(cfg: DictConfig) -> Optional[dict[str, torch.Tensor]]:
    """trainer.init_from: the weights of a RegToMe checkpoint of the same architecture."""
    path = cfg.trainer.get("init_from")
    if not path:
        return None
    init = load_checkpoint(path)
    saved = upgrade_config(init["config"])
    check_same_architecture(saved["model"], OmegaConf.to_container(cfg.model, resolve=True), path)
    return init["model"]


def build_run(cfg: DictConfig, run_dir: Path, checkpoint: Optional[dict]) -> TrainRun:
    """Data, model and optimizer, built once; the state restored from `checkpoint` when resuming."""
    classes = class_names(cfg.dataset)
    num_classes = count_classes(cfg.dataset)
    cfg = OmegaConf.merge(cfg, {"dataset": {"num_classes": num_classes}})  # saved with the checkpoints
    init = initial_weights(cfg) if checkpoint is None else None
    session = open_session(cfg, num_classes, weights=init, weights_path=cfg.trainer.get("init_from"))
    tc, info = cfg.trainer, session.info
    splits = build_datasets(cfg.dataset, session.inputs, augment=tc.augment, seed=cfg.seed, classes=classes)
    drop_last = tc.mixup > 0 or tc.cutmix > 0  # mixup needs even batches
    train_set = EpochSeeded(splits["train"], cfg.seed)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=drop_last)
    updates_per_epoch = -(-len(sampler) // tc.batch_size // tc.accum_steps)
    if tc.max_steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, -(-tc.max_steps_per_epoch // tc.accum_steps))
    opt = build_optimization(session.model, tc, num_classes, updates_per_epoch, session.device, session.dtype)
    model = session.model
    if info.enabled:
        device = session.device
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    state = TrainState()
    if checkpoint is not None:
        saved = restore_training(_unwrap(model), opt, checkpoint, run_dir / "checkpoints" / "last.pt",
                                 same_length=checkpoint["config"]["trainer"]["epochs"] == tc.epochs)
        set_rng_state(checkpoint["rng"])
        state = TrainState(**saved)
        opt.scheduler.step_update(num_updates=state.num_updates)
    if info.rank > 0:  # a mid-epoch checkpoint holds the sums of all ranks: count them once, on rank 0
        state.epoch_sums = empty_sums()
    val_loader = eval_loader(splits["val"], cfg.runtime.eval_batch_size, session.workers, info)
    if info.is_main:
        log.info("training %s on %s (%d train / %d val images) on %s, %s, %d epochs; run folder %s",
                 model_label(cfg.model), cfg.dataset.name, len(train_set), len(splits["val"]), session.device,
                 str(session.dtype or "fp32").replace("torch.", ""), tc.epochs, run_dir)
    return TrainRun(cfg=cfg, run_dir=run_dir, session=session, model=model, train_set=train_set, sampler=sampler,
                    val_loader=val_loader, opt=opt, state=state, classes=classes, drop_last=drop_last)


def epoch_loader(run: TrainRun, epoch: int) -> DataLoader:
    """This epoch's loader, skipping the batches a resumed run already trained."""
    tc, seed = run.cfg.trainer, run.cfg.seed
    run.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)  # before the workers copy the data set
    return DataLoader(run.train_set, batch_size=tc.batch_size, drop_last=run.drop_last,
                      sampler=ResumableSampler(run.sampler, skip=run.state.step_in_epoch * tc.batch_size),
                      num_workers=run.session.workers, pin_memory=run.session.device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed * 1000 + epoch))


# --- running it -----------------------------------------------------------------------------------

def save(run: TrainRun, best: bool) -> None:
    """last.pt (and best.pt), written by rank 0 while the others wait."""
    if run.session.info.is_main:
        config = OmegaConf.to_container(run.cfg, resolve=True)
        checkpoint = training_checkpoint(_unwrap(run.model), run.opt, asdict(run.state), config, rng_state(),
                                         run.classes)
        save_training(checkpoint, run.ckpt_dir, best)
    barrier(run.session.info)


def interrupted(run: TrainRun, stop: GracefulStop) -> TrainingInterrupted:
    """The one interrupt path: last.pt written, the signal passed on (SLURM requeue), the resume command said."""
    save(run, best=False)
    stop.pass_on()
    state = run.state
    return TrainingInterrupted(stop.signum, (
        f"stopped by {signal.Signals(stop.signum).name} at epoch {state.epoch} step {state.step_in_epoch}; "
        f"state saved in {run.ckpt_dir / 'last.pt'}; continue with: "
        f"python main.py task=train hydra.run.dir={run.run_dir} trainer.resume=true"))


def train_epoch(run: TrainRun, epoch: int, stop: GracefulStop, writer: Optional[SummaryWriter]) -> dict[str, Any]:
    """One epoch: train, validate when due, checkpoint; returns the epoch's metrics."""
    started, state, session, tc = time.perf_counter(), run.state, run.session, run.cfg.trainer
    rate = train_one_epoch(run.model, epoch_loader(run, epoch), session.prepare, run.opt, state, session.device,
                           session.info, stop, tc.max_steps_per_epoch, writer, tc.log_every)
    state.epoch_sums = _global_sums(state.epoch_sums, session.device, session.info)
    if stop.signum is not None:
        raise interrupted(run, stop)
    sums = state.epoch_sums
    metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": sums["loss"] / max(sums["samples"], 1),
                               "train_acc": 100 * sums["correct"] / max(sums["samples"], 1), "train_images_per_s": rate}
    state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, empty_sums()
    if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
        eval_model = run.opt.ema.module if run.opt.ema is not None else _unwrap(run.model)
        val = evaluate(eval_model, run.val_loader, session.device, session.dtype, session.info,
                       prepare=session.prepare, desc="val")
        metrics |= {f"val_{k}": v for k, v in val.items()}
    metrics["seconds"] = time.perf_counter() - started
    state.history.append(metrics)
    is_best = metrics.get("val_top1", -1.0) > state.best_top1
    state.best_top1 = max(state.best_top1, metrics.get("val_top1", -1.0))
    save(run, best=is_best)
    return metrics


def fit(run: TrainRun, writer: Optional[SummaryWriter]) -> dict[str, Any]:
    """The epochs still to train (all of them, or the rest after a resume); returns the last metrics."""
    state, tc = run.state, run.cfg.trainer
    metrics: dict[str, Any] = state.history[-1] if state.history else {}
    with GracefulStop() as stop:
        for done, epoch in enumerate(range(state.epoch, tc.epochs), start=1):
            metrics = train_epoch(run, epoch, stop, writer)
            if run.session.info.is_main:
                _log_epoch(writer, metrics, tc.epochs)
            if tc.stop_after_epochs and done >= tc.stop_after_epochs and state.epoch < tc.epochs:
                if run.session.info.is_main:
                    log.info("stopping after %d epochs (trainer.stop_after_epochs); continue with: python main.py "
                             "task=train hydra.run.dir=%s trainer.resume=true", done, run.run_dir)
                break
    return metrics


@contextmanager
def tensorboard(run_dir: Path, info: DistInfo) -> Iterator[Optional[SummaryWriter]]:
    """Rank 0's TensorBoard writer, closed however the run ends (done, interrupted, NaN)."""
    writer = SummaryWriter(str(run_dir / "tensorboard")) if info.is_main else None
    try:
        yield writer
    finally:
        if writer is not None:
            writer.close()


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """A training run: build data, model and optimizer once; train, validate and checkpoint per epoch."""
    cfg, checkpoint = resumed_config(cfg, run_dir, overrides)
    check_trainer_config(cfg)
    training = build_run(cfg, run_dir, checkpoint)
    with tensorboard(run_dir, training.session.info) as writer:
        metrics = fit(training, writer)
    return finish(training, metrics)


def finish(run: TrainRun, metrics: dict[str, Any]) -> dict[str, Any]:
    """results.json of the run (rank 0) and the closing line."""
    state, session = run.state, run.session
    record = run_record(run.cfg, _unwrap(run.model), metrics, session.device, session.dtype, run.cfg.trainer.batch_size,
                        extra={"epochs": state.epoch, "best_top1": state.best_top1, "history": state.history,
                               "checkpoint": str(run.ckpt_dir / "best.pt"), "classes": run.classes})
    if session.info.is_main:
        write_results(run.run_dir, record)
        best = f"best val top-1 {state.best_top1:.2f}" if state.best_top1 >= 0 else "no validation yet"
        log.info("done: %s; run folder %s", best, run.run_dir)
    return record


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
