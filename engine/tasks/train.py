"""task=train: `run` = resumed config -> `build_run` (engine.training.setup) -> `train_epoch` per epoch (each one
`engine.training.loop`) -> results.json. Checkpoints are atomic; SIGTERM/SIGINT stop after the current optimizer step
with last.pt written; a NaN/inf loss stops before anything is written. A resume restores model, optimizer,
schedule, scaler, EMA, RNG states and the position inside the epoch, and each sample's augmentation is seeded by
(seed, epoch, sample): a resumed run ends with the weights of an uninterrupted one, whatever the worker count."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from data import DatasetError

from ..errors import SaveFailed, TrainingInterrupted, UserError, one_line
from ..run.checkpoint import apply_overrides, atomic_save, load_checkpoint, overrides_in, read_checkpoint
from ..run.folder_claim import append_resume
from ..run.results import run_record, write_results
from ..run.runtime import barrier, gather_objects, launch_rank, rng_state
from ..training.loop import GracefulStop, empty_sums, evaluate, train_one_epoch
from ..training.setup import TrainRun, build_run, check_trainer_config, epoch_loader

log = logging.getLogger(__name__)
# What a resume may change: how it trains and where it runs, and whether unreadable images are skipped (an
# unreadable image met mid-run); everything else is the saved run's.
RESUME_OVERRIDES = ("trainer", "runtime", "dataset.skip_unreadable")


def position(epochs_done: int, step_in_epoch: int) -> str:
    """Where a run stands, epochs counted from 1 as the progress bar, main.log and resumes.yaml do: 'epoch 2 step 5'."""
    return f"epoch {epochs_done + 1} step {step_in_epoch}"


def resume_command(run_dir: Path) -> str:
    """The command that continues the run, with this interpreter (a venv's python, not whatever `python` is on PATH)."""
    return f"{sys.executable} main.py task=train hydra.run.dir={run_dir} trainer.resume=true"


def save(run: TrainRun, best: bool) -> None:
    """last.pt, written by rank 0 while the others wait; best.pt too when this state is the best so far, without
    what only a resume (from last.pt) reads: the optimizer state would triple its size."""
    rng, last = gather_objects(rng_state(), run.session.info), run.ckpt_dir / "last.pt"
    if run.session.info.is_main:
        checkpoint = {  # what a resume restores (`build_run`), the config included
            "model": run.session.model.state_dict(),
            "ema": run.opt.ema.module.state_dict() if run.opt.ema is not None else None,
            "optimizer": run.opt.optimizer.state_dict(),
            "scheduler": run.opt.scheduler.state_dict(),
            "scaler": run.opt.scaler.state_dict(),
            "state": asdict(run.state),
            "rng": dict(rng[0]),  # rank 0's, as one process saves it
            "rng_per_rank": [dict(r) for r in rng] if len(rng) > 1 else None,  # each rank's, in rank order
            "config": OmegaConf.to_container(run.cfg, resolve=True),
            "classes": run.classes,
        }
        try:
            atomic_save(checkpoint, last)
            if best:
                resume_only = ("optimizer", "scheduler", "scaler", "rng", "rng_per_rank")
                atomic_save({k: v for k, v in checkpoint.items() if k not in resume_only}, run.ckpt_dir / "best.pt")
        except OSError as err:  # one line: why (the OS's words: 'No space left on device'), what is intact, what next
            try:  # memory-mapped: only the small state is read
                saved = load_checkpoint(last, mmap=True)["state"]
                intact = f"{last} ({position(saved['epoch'], saved['step_in_epoch'])}) is intact"
            except Exception:  # none yet, or unreadable
                intact = f"no earlier {last} to keep"
            raise SaveFailed(
                f"error: could not save a checkpoint in {run.ckpt_dir}: {err.strerror or err} ([Errno {err.errno}]); "
                f"{intact}; once it can be written again, continue with: {resume_command(run.run_dir)}"
            ) from None
    barrier(run.session.info)


def unreadable_data(run: TrainRun, err: DatasetError) -> DatasetError:
    """An image that cannot be read, met in training or validation (ImageNet has some): what was trained is
    saved first, and the error says how to go on. Not saved: under torchrun (the other ranks cannot join the
    save), before the first update, or inside a gradient-accumulation window (its gradients would be lost)."""
    state = run.state
    if run.session.info.enabled or state.num_updates == 0 or state.step_in_epoch % run.cfg.trainer.accum_steps != 0:
        return err
    save(run, best=False)
    return DatasetError(
        f"{one_line(err)}; state saved in {run.ckpt_dir / 'last.pt'} ({position(state.epoch, state.step_in_epoch)}); "
        f"after replacing the file, continue with: {resume_command(run.run_dir)} (add dataset.skip_unreadable=true "
        "to skip such training images instead)"
    )


def train_epoch(run: TrainRun, epoch: int, stop: GracefulStop, writer: Optional[SummaryWriter]) -> dict[str, Any]:
    """One epoch: train, validate when due, checkpoint, log; returns the epoch's metrics."""
    started, state, session, tc = time.perf_counter(), run.state, run.session, run.cfg.trainer
    try:  # an unreadable image in training or validation (then the epoch is trained: kept)
        trained = train_one_epoch(run, epoch_loader(run, epoch), stop, writer, tc.max_steps_per_epoch)
        if stop.signum is not None:  # last.pt written, the signal passed on (SLURM requeue), the resume command said
            save(run, best=False)
            stop.pass_on()
            raise TrainingInterrupted(
                stop.signum,
                f"stopped by {signal.Signals(stop.signum).name} at {position(state.epoch, state.step_in_epoch)}; "
                f"state saved in {run.ckpt_dir / 'last.pt'}; continue with: {resume_command(run.run_dir)}",
            )
        metrics: dict[str, Any] = {"epoch": epoch + 1} | trained
        state.epoch, state.step_in_epoch, state.epoch_sums = epoch + 1, 0, empty_sums()
        if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
            val = evaluate(run.eval_model, run.val_loader, session, "val")
            metrics |= {f"val_{k}": v for k, v in val.items()}
    except DatasetError as err:
        raise unreadable_data(run, err) from None
    metrics["seconds"] = time.perf_counter() - started
    state.history.append(metrics)
    is_best = metrics.get("val_top1", -1.0) > state.best_top1
    state.best_top1 = max(state.best_top1, metrics.get("val_top1", -1.0))
    save(run, best=is_best)
    if session.info.is_main:  # one line per epoch (stdout and main.log)
        top1 = f"val top-1 {metrics['val_top1']:.2f}" if "val_top1" in metrics else "val top-1 -"
        log.info(
            f"epoch {metrics['epoch']}/{tc.epochs}  train loss {metrics['train_loss']:.4f}  {top1}  "
            f"{metrics['train_images_per_s']:.0f} img/s  {metrics['seconds']:.1f} s"
        )
    if writer is not None:  # the epoch's scalars in TensorBoard (rank 0)
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(f"epoch/{key}", value, metrics["epoch"])
        writer.flush()
    return metrics


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """A training run: build data, model and optimizer once; train, validate and checkpoint per epoch."""
    last, saved = run_dir / "checkpoints" / "last.pt", None
    # trainer.resume=true, or a SLURM job requeued after a preemption or time-out
    if cfg.trainer.resume or (int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 and last.exists()):
        if not last.exists():
            raise UserError(
                f"trainer.resume=true but {last} does not exist; pass hydra.run.dir=RUN_DIR of the run to continue"
            )
        saved = read_checkpoint(last)
        cfg = apply_overrides(saved.config, cfg, overrides, groups=RESUME_OVERRIDES)
        cfg.trainer.resume = True
    check_trainer_config(cfg)
    if saved is not None:
        done, step = saved.state["epoch"], saved.state["step_in_epoch"]
        if done >= cfg.trainer.epochs:  # not an error (exit 0): a script or a requeued job resuming what it finds
            log.info(
                f"the run in {run_dir} finished its {done} epochs (trainer.epochs={cfg.trainer.epochs}): nothing to "
                f"resume, nothing changed; to train it longer, add trainer.epochs=N with N > {done}"
            )
            return {}
        if launch_rank() == 0:  # in main.log, and in resumes.yaml with the keys this command line changed
            append_resume(run_dir, overrides_in(overrides, RESUME_OVERRIDES), done + 1, step)
            log.info("resumed from %s of %s", position(done, step), saved.path)
    training = build_run(cfg, run_dir, saved)
    state, tc = training.state, training.cfg.trainer
    metrics: dict[str, Any] = state.history[-1] if state.history else {}
    trained = 0
    # rank 0's TensorBoard writer, closed however the run ends (done, interrupted, NaN)
    with SummaryWriter(str(run_dir / "tensorboard")) if training.session.info.is_main else nullcontext() as writer:
        with GracefulStop() as stop:  # the epochs still to train: all, the rest after a resume, or stop_after_epochs
            for trained, epoch in enumerate(range(state.epoch, tc.epochs), start=1):
                metrics = train_epoch(training, epoch, stop, writer)
                if tc.stop_after_epochs and trained >= tc.stop_after_epochs and state.epoch < tc.epochs:
                    break
    extra = {"epochs": state.epoch, "best_top1": state.best_top1, "history": state.history}
    extra |= {"checkpoint": str(training.ckpt_dir / "best.pt"), "classes": training.classes}
    extra["augment"] = tc.augment  # training images: augmented before `preprocessing`, if true
    record = run_record(training.cfg, training.session, metrics, tc.batch_size, extra)
    if training.session.info.is_main:
        write_results(run_dir, record)
        best = f"best val top-1 {state.best_top1:.2f}" if state.best_top1 >= 0 else "no validation yet"
        log.info("done: %s; run folder %s", best, run_dir)
        if state.epoch < tc.epochs:  # trainer.stop_after_epochs: the run goes on later
            continuing = resume_command(run_dir)
            log.info("stopping after %d epochs (trainer.stop_after_epochs); continue with: %s", trained, continuing)
    return record
