"""A run folder's record stays true: one owner at a time (a lock), a config written once, resumes appended.

- `RunLock`: RUN/.lock holds the pid, host and SLURM job of the process working in the folder,
  taken atomically (O_EXCL). A lock left by a dead process on this host, or by an earlier try of
  the same SLURM job (a requeue), is taken over with a warning; a live one refuses the second process.
- `check_folder`: which command may start in an existing folder: a resume continues its own run,
  overwrite moves the old run aside (`previous/<time>/`), anything else is refused.
- `append_resume`: a resume adds an entry to RUN/resumes.yaml; `.hydra/config.yaml` keeps the
  config the run started with.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
RESULT_FILES = ("results.json", "checkpoints/last.pt", "checkpoints/best.pt")  # what a run must not lose
RECORD_FILES = (".hydra/config.yaml", *RESULT_FILES)
HYDRA_FILES = {".hydra", "main.log", LOCK_NAME}
STARTED_FILES = HYDRA_FILES | {"tensorboard"}  # what a run writes before its first result


def holds_run(folder: Path) -> list[str]:
    """The files that show `folder` holds a run's record ([] for a new or empty folder)."""
    return [name for name in RECORD_FILES if (folder / name).exists()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """RUN/.lock, held while a process trains, evaluates or exports in RUN."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def describe(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def acquire(self) -> "RunLock":
        """Take the lock or raise UserError naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None or not self._can_take_over(holder):
                    raise UserError(self._refusal(holder)) from None
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.describe(), f)
            self.held = True
            return self
        raise UserError(f"{self.path.parent} is locked ({self.path}); another process took it first")

    def release(self) -> None:
        if self.held:
            self.held = False
            holder = self._read()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def _read(self) -> Optional[dict[str, Any]]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}  # released meanwhile: try again
        except (OSError, ValueError):
            return None  # unreadable: never taken over silently

    def _can_take_over(self, holder: dict[str, Any]) -> bool:
        if not holder:
            return True
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:
            return True  # the same SLURM job, requeued: its earlier try is gone
        return holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1)))

    def _take_over(self, holder: dict[str, Any]) -> None:
        if holder:
            log.warning(
                "taking over the lock of %s left by process %s on %s (started %s), which is gone",
                self.path.parent,
                holder.get("pid"),
                holder.get("host"),
                holder.get("started"),
            )
        stale = self.path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
        try:
            os.rename(self.path, stale)  # only one process wins the rename
            stale.unlink()
        except FileNotFoundError:
            pass

    def _refusal(self, holder: Optional[dict[str, Any]]) -> str:
        if holder is None:
            return f"{self.path.parent} is locked by an unreadable {self.path}; if no run uses the folder, delete it"
        return (
            f"{self.path.parent} is in use by process {holder.get('pid')} on {holder.get('host')} (since "
            f"{holder.get('started')}); wait for it to finish or use another folder"
        )


def check_folder(folder: Path, task: str, resume: bool, overwrite: bool, run_dir_given: bool = True) -> str:
    """What a command may do in `folder` before anything is written: 'new', 'resume', 'overwrite' or
    'restart' (the folder holds only the log and config of a run that ended before its first checkpoint or
    result: nothing that could be lost, so its files are moved aside and the command starts there).

    Raises UserError (nothing written) when the folder holds another run's record and the command
    neither resumes it nor overwrites it, or when a resume finds nothing to resume; each error names
    the way out.
    """
    record = holds_run(folder)
    if task == "train" and resume:
        last = folder / "checkpoints" / "last.pt"
        if last.exists():
            return "resume"
        if not run_dir_given:
            raise UserError(
                "trainer.resume=true needs the folder of the run to continue: add hydra.run.dir=RUN "
                "(the run folder its log names, e.g. outputs/train/...)"
            )
        if not record:
            raise UserError(
                f"trainer.resume=true but {last} does not exist: {folder} holds no run (the folder was left as it "
                "is); pass hydra.run.dir=RUN of the run to continue"
            )
        if set(record) & set(RESULT_FILES):
            raise UserError(
                f"trainer.resume=true but {last} does not exist: {folder} holds a run ({', '.join(record)}) with "
                "no state to continue from; train into another folder (drop hydra.run.dir), or "
                f"trainer.overwrite=true to move it to {folder / 'previous'}/ and train a new run there"
            )
        raise UserError(
            f"trainer.resume=true but {last} does not exist: the run in {folder} stopped before its first "
            "checkpoint, so there is nothing to continue; train it anew with the same command without "
            f"trainer.resume=true (its old files are kept in {folder / 'previous'}/)"
        )
    if not record:
        return "new"
    if {p.name for p in folder.iterdir()} <= STARTED_FILES | {"previous"}:
        return "restart"  # only the config, log and scalars of a run that ended before its first checkpoint
    if task == "train" and overwrite:
        return "overwrite"
    what = ", ".join(record)
    if task == "train":
        raise UserError(
            f"{folder} already holds a run ({what}); continue it with trainer.resume=true, train "
            "into another folder (drop hydra.run.dir), or trainer.overwrite=true to move it to "
            f"{folder / 'previous'}/ and train a new run there"
        )
    raise UserError(
        f"{folder} already holds a run ({what}); write task={task} into another folder (drop hydra.run.dir)"
    )


def move_aside(
    folder: Path, said: str = "trainer.overwrite=true: the run that was in {folder} is now in {target}"
) -> Path:
    """Move every file of the run in `folder` into folder/previous/<time>/ (trainer.overwrite=true, or a
    folder whose run ended before its first checkpoint) and log `said` with the two folders filled in."""
    target = folder / "previous" / time.strftime("%Y-%m-%d_%H-%M-%S")
    target.mkdir(parents=True)
    for entry in folder.iterdir():
        if entry.name not in ("previous", LOCK_NAME):
            shutil.move(str(entry), str(target / entry.name))
    log.warning(said.format(folder=folder, target=target))
    return target


def append_resume(folder: Path, overrides: list[str], epoch: int, step: int) -> None:
    """Add what this resume ran with to RUN/resumes.yaml (the original .hydra/config.yaml is kept)."""
    entry = (
        f"- time: '{time.strftime('%Y-%m-%d %H:%M:%S')}'\n  host: {socket.gethostname()}\n"
        f"  pid: {os.getpid()}\n  from_epoch: {epoch}\n  from_step: {step}\n"
        f"  overrides: {json.dumps(list(overrides))}\n"
    )
    with open(folder / "resumes.yaml", "a") as f:
        f.write(entry)


def discard_new_folder(folder: Path, created: bool) -> None:
    """After a refused command: remove what it wrote into `folder` (Hydra's files, the lock), and the
    folder itself and its empty parents if this command created it. Anything else stays."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    (folder / LOCK_NAME).unlink(missing_ok=True)
    if not {p.name for p in folder.iterdir()} <= HYDRA_FILES:
        return  # a run's files are there: keep everything
    if not created:  # the user's own (empty) folder: remove only what this command wrote
        shutil.rmtree(folder / ".hydra", ignore_errors=True)
        (folder / "main.log").unlink(missing_ok=True)
        return
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    while parent != parent.parent and parent.name not in ("", ".") and _is_empty(parent):
        parent.rmdir()
        if parent.name in ("outputs", "multirun"):
            break
        parent = parent.parent


def _is_empty(folder: Path) -> bool:
    try:
        return not any(folder.iterdir())
    except OSError:
        return False
