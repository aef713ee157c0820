"""A run folder's record stays true: one owner at a time (a lock), a config written once, resumes appended.

- `RunLock`: RUN/.lock, an `fcntl.flock` held for the life of the process working in the folder. The kernel
  releases it when that process ends, however it ends (SIGKILL, a crash, a requeued SLURM job), so a lock is
  never stale and nothing is taken over; the pid and host written in the file only name the holder in the
  message a second process gets.
- `check_folder`: which command may start in an existing folder: a resume continues its own run,
  overwrite moves the old run aside (`previous/<time>/`), anything else is refused.
- `append_resume`: a resume adds an entry to RUN/resumes.yaml; `.hydra/config.yaml` keeps the
  config the run started with.
"""

from __future__ import annotations

import fcntl
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


_HELD: dict[int, "RunLock"] = {}  # descriptor -> lock, of the locks this process holds


def _forget_held_locks() -> None:
    """In a forked child (a loader worker): close its copies of the lock descriptors. The parent holds the locks;
    a child that outlives a killed parent must not keep its folder locked."""
    for fd, lock in list(_HELD.items()):
        os.close(fd)
        lock._fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_locks)


class RunLock:
    """RUN/.lock, held while a process trains, evaluates or exports in RUN: an exclusive `fcntl.flock` on the
    file, which only one process can hold and which the kernel releases when the process ends."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise UserError: naming the process that holds it, or why the file cannot be locked."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(self._refusal()) from None
            except OSError as err:  # ENOLCK: a network file system without locking
                os.close(fd)
                raise UserError(
                    f"cannot lock {self.path} ({err.strerror}): its file system does not lock files across "
                    "processes (an NFS mount without a lock daemon, Lustre without -o flock); use a run folder on "
                    "a local or locking file system (hydra.run.dir=DIR)"
                ) from None
            if self._is_the_lock_file(fd):
                break
            os.close(fd)  # the holder released and removed the file between our open and our flock: again
        try:  # the holder's name, for the message a second process gets (a file only readable here: no name)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self.describe()).encode())
        except OSError:
            pass
        self._fd = fd
        _HELD[fd] = self
        return self

    def release(self) -> None:
        """Remove the file while still holding it, then let go (a process waiting on the old file tries again)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            _HELD.pop(self._fd, None)
            os.close(self._fd)
            self._fd = None

    def describe(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _open(self) -> int:
        """The lock file, created if need be; read-only when another user's (flock needs no write access)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:
                return os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise UserError(f"cannot open the lock file {self.path} ({err.strerror}); use another folder") from None

    def _is_the_lock_file(self, fd: int) -> bool:
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _refusal(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):  # the holder has the lock but has not written its name yet
            holder = {}
        who = f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"
        if not holder:
            who = "another process (starting)"
        return f"{self.path.parent} is in use by {who}; wait for it to finish or use another folder"


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
