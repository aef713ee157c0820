"""Building a training run once: data, model, optimizer and schedule, and the state restored from last.pt when
resuming."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from data import EpochSeeded, ResumableSampler, build_datasets, class_names, count_classes

from ..models.build import model_label
from ..run.checkpoint import SavedRun, check_same_architecture, read_checkpoint
from ..run.results import merge_record, r_that_ran
from ..run.runtime import DistInfo, autocast, seed_everything, set_rng_state
from ..run.session import Session, open_session
from .loop import Optimization, TrainState, empty_sums, eval_loader

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class TrainRun:
    """A training run as `build_run` sets it up: what `train_epoch` needs, and what results.json reports."""

    cfg: DictConfig
    run_dir: Path
    session: Session
    model: nn.Module  # what a training step calls: DDP-wrapped under torchrun, compiled with runtime.compile
    eval_model: nn.Module  # what validation calls: the EMA weights, or the plain model (compiled if asked)
    train_set: EpochSeeded
    sampler: DistributedSampler
    val_loader: DataLoader
    opt: Optimization
    state: TrainState
    classes: Optional[list[str]]

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def check_trainer_config(cfg: DictConfig) -> None:
    """A warning for trainer values that waste the run (the schema refused what cannot work at all)."""
    tc = cfg.trainer
    if tc.warmup_epochs >= tc.epochs:
        log.warning(
            f"trainer.warmup_epochs={tc.warmup_epochs} covers the whole run (trainer.epochs={tc.epochs}): the learning "
            "rate never reaches trainer.lr; lower trainer.warmup_epochs"
        )


def build_optimization(session: Session, tc: DictConfig, num_classes: int, samples: int) -> Optimization:
    """timm's optimizer and cosine schedule (stepped per update: its unit is the updates of an epoch of `samples`
    samples on this process), the loss, Mixup/CutMix, the EMA, the scaler."""
    updates_per_epoch = -(-samples // tc.batch_size // tc.accum_steps)
    if tc.max_steps_per_epoch:
        updates_per_epoch = min(updates_per_epoch, -(-tc.max_steps_per_epoch // tc.accum_steps))
    mixup = None
    if tc.mixup > 0 or tc.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=tc.mixup, cutmix_alpha=tc.cutmix, label_smoothing=tc.label_smoothing, num_classes=num_classes
        )
    optimizer = create_optimizer_v2(session.model, opt=tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=tc.epochs,
        warmup_epochs=tc.warmup_epochs,
        warmup_lr=tc.warmup_lr,
        min_lr=tc.min_lr,
        step_on_epochs=False,
        updates_per_epoch=max(updates_per_epoch, 1),
    )
    return Optimization(
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(session.device.type, enabled=session.dtype == torch.float16),
        loss_fn=SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing),
        amp_autocast=partial(autocast, session.device, session.dtype),
        mixup=mixup,
        ema=ModelEmaV3(session.model, decay=tc.ema_decay) if tc.ema else None,
        accum_steps=tc.accum_steps,
        clip_grad=tc.clip_grad,
    )


def initial_weights(cfg: DictConfig) -> Optional[dict[str, torch.Tensor]]:
    """trainer.init_from: the weights of a RegToMe checkpoint of the same architecture (its EMA's when kept)."""
    path = cfg.trainer.init_from
    if not path:
        return None
    init = read_checkpoint(path)
    check_same_architecture(init.config.model, OmegaConf.to_container(cfg.model, resolve=True), path)
    return init.weights


def build_run(cfg: DictConfig, run_dir: Path, saved: Optional[SavedRun]) -> TrainRun:
    """Data, model and optimizer, built once; the state restored from `saved` (last.pt) when resuming."""
    classes, num_classes = class_names(cfg.dataset), count_classes(cfg.dataset)
    cfg = OmegaConf.merge(cfg, {"dataset": {"num_classes": num_classes}})  # saved with the checkpoints
    if saved is None:  # trainer.init_from, or the model group's own (pretrained or random) weights
        weights, weights_path = initial_weights(cfg), cfg.trainer.init_from
    else:  # a resume: last.pt's model weights, so no pretrained weights are fetched only to be replaced
        weights, weights_path = saved.checkpoint["model"], saved.path
    session = open_session(cfg, num_classes, weights=weights, weights_path=weights_path)
    tc, info = cfg.trainer, session.info
    splits = build_datasets(cfg.dataset, session.inputs, augment=tc.augment, seed=cfg.seed, classes=classes)
    drop_last = tc.mixup > 0 or tc.cutmix > 0  # mixup needs even batches
    train_set = EpochSeeded(splits["train"], cfg.seed)
    sampler = DistributedSampler(
        train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed, drop_last=drop_last
    )
    opt = build_optimization(session, tc, num_classes, len(sampler))
    model = session.model
    if info.enabled:
        cuda = session.device.type == "cuda"
        model = DistributedDataParallel(model, device_ids=[session.device.index] if cuda else None)
    state = TrainState()
    if saved is not None:  # the rest of last.pt, as `save` wrote it (its weights went to open_session)
        checkpoint = saved.checkpoint
        if opt.ema is not None and checkpoint.get("ema") is not None:
            opt.ema.module.load_state_dict(checkpoint["ema"])
        opt.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["config"]["trainer"]["epochs"] == tc.epochs:  # given more epochs: the new length's schedule
            opt.scheduler.load_state_dict(checkpoint["scheduler"])
        opt.scaler.load_state_dict(checkpoint["scaler"])
        opt.scheduler.step_update(num_updates=checkpoint["state"]["num_updates"])
        state = TrainState(**checkpoint["state"])
        restore_random_state(checkpoint, cfg.seed + state.num_updates, info)
    eval_model = opt.ema.module if opt.ema is not None else session.runner()  # never through DDP: shards differ
    model = session.runner(model)
    if info.rank > 0:  # a mid-epoch checkpoint holds the sums of all ranks: count them once, on rank 0
        state.epoch_sums = empty_sums()
    val_set = bounded(splits["val"], tc.get("max_val_steps"), session.eval_batch_size * info.world_size)
    if info.is_main:
        r = r_that_ran(merge_record(session.model, session.inputs["input_size"]))
        log.info(
            f"training {model_label(cfg.model)} on {cfg.dataset.name} ({len(train_set)} train / {len(val_set)} val "
            f"images) on {session.device}, {str(session.dtype or 'fp32').replace('torch.', '')}, {tc.epochs} epochs, "
            f"r={r}, protect={session.model.protect}; run folder {run_dir}"
        )
    return TrainRun(
        cfg=cfg,
        run_dir=run_dir,
        session=session,
        model=model,
        eval_model=eval_model,
        train_set=train_set,
        sampler=sampler,
        val_loader=eval_loader(val_set, session),
        opt=opt,
        state=state,
        classes=classes,
    )


def bounded(dataset: Dataset, max_steps: Optional[int], global_batch: int) -> Dataset:
    """`max_steps` batches' worth of `dataset` drawn across all of it (trainer.max_val_steps: a smoke run's
    validation). An image folder lists its images by class, so its first batches would be one class alone;
    the subset is a fixed random draw instead, the same images every epoch, on resume and in every run."""
    size = len(dataset)  # type: ignore[arg-type]
    if not max_steps or max_steps * global_batch >= size:
        return dataset
    # seed 0, not the run's: one subset for every run of a data set, whatever its seed, so their val top-1s compare
    draw = torch.randperm(size, generator=torch.Generator().manual_seed(0))
    return Subset(dataset, sorted(draw[: max_steps * global_batch].tolist()))


def restore_random_state(checkpoint: dict, fresh_seed: int, info: DistInfo) -> None:
    """Each rank continues its own random streams from the checkpoint. A run resumed on another number of ranks
    than it saved: rank 0 continues, the others start from `fresh_seed` + rank (still their own)."""
    saved = checkpoint.get("rng_per_rank") or [checkpoint["rng"]]
    if len(saved) == info.world_size or info.rank == 0:
        set_rng_state(saved[info.rank])
    else:
        seed_everything(fresh_seed + info.rank)


def epoch_loader(run: TrainRun, epoch: int) -> DataLoader:
    """This epoch's loader, skipping the batches a resumed run already trained."""
    tc, seed = run.cfg.trainer, run.cfg.seed
    run.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)  # before the workers copy the data set
    return run.session.loader(
        run.train_set,
        batch_size=tc.batch_size,
        drop_last=run.sampler.drop_last,
        sampler=ResumableSampler(run.sampler, skip=run.state.step_in_epoch * tc.batch_size),
        generator=torch.Generator().manual_seed(seed * 1000 + epoch),
    )
