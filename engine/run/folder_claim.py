"""A run folder: its name (`run_id`), one owner at a time (`RunLock`), which command may start in it
(`check_folder`), resumes appended to RUN/resumes.yaml, and every kept file written whole (`atomic_write`)."""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import shutil
import socket
import time
from contextlib import suppress
from pathlib import Path
from typing import IO, Any, Callable, Optional

import yaml

from ..errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"
RESULT_FILES = ("results.json", "checkpoints/last.pt", "checkpoints/best.pt")  # what a run must not lose
RECORD_FILES = (".hydra/config.yaml", *RESULT_FILES)
HYDRA_FILES = {".hydra", "main.log", LOCK_NAME}
STARTED_FILES = HYDRA_FILES | {"tensorboard"}  # what a run writes before its first result


@functools.lru_cache(maxsize=1)
def run_id() -> str:
    """'YYYY-mm-dd_HH-MM-SS_PID', unique per run and shared by the ranks of one job. REGTOME_RUN_ID wins (a
    multirun sets it for the jobs it submits); under SLURM 'slurm-JOBID', the same after a requeue, so the job
    finds its own last.pt; under torchrun the agent's pid and start time, the parent of every rank."""
    if os.environ.get("REGTOME_RUN_ID"):
        return os.environ["REGTOME_RUN_ID"]
    if slurm_job := os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{slurm_job}"
    pid, started = os.getpid(), time.time()
    if "LOCAL_RANK" in os.environ:
        pid = os.getppid()
        with suppress(OSError, ValueError, IndexError, StopIteration):  # its start time from Linux /proc, else now
            with open(f"/proc/{pid}/stat") as f:
                ticks = int(f.read().rsplit(")", 1)[1].split()[19])
            with open("/proc/stat") as f:
                boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
            started = boot + ticks / os.sysconf("SC_CLK_TCK")
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started)) + f"_{pid}"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], text: bool = False) -> Path:
    """Call `write(file)` on a temp file in the same folder, fsync, then rename it over `path`: a process killed
    at any moment, or a full disk, leaves the old file or the new one, never half of one (and no temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w" if text else "wb", newline="" if text else None) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return path


_HELD: dict[int, "RunLock"] = {}  # descriptor -> lock, of the locks this process holds


def _forget_held_locks() -> None:
    """In a forked child (a loader worker): close its copies of the lock descriptors, so that a child that
    outlives a killed parent does not keep the folder locked."""
    for fd, lock in _HELD.items():
        os.close(fd)
        lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_held_locks)


class RunLock:
    """RUN/.lock, held while a process trains, evaluates or exports in RUN: an exclusive `fcntl.flock` that the
    kernel releases when the process ends, however it ends (SIGKILL, a crash, a requeue), so a lock is never
    stale. The pid and host written in the file only name the holder to a second process."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise UserError: naming the process that holds it, or why the file cannot be locked."""
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if isinstance(err, BlockingIOError):
                    raise UserError(self._refusal()) from None
                raise UserError(  # ENOLCK: a network file system without locking
                    f"cannot lock {self.path} ({err.strerror}): its file system does not lock files across "
                    "processes (an NFS mount without a lock daemon, Lustre without -o flock); use a run folder on "
                    "a local or locking file system (hydra.run.dir=DIR)"
                ) from None
            with suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    break
            os.close(fd)  # the holder released and removed the file between our open and our flock: again
        with suppress(OSError):  # the holder's name, for the message a second process gets (read-only file: none)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
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

    def _refusal(self) -> str:
        who = "another process (starting)"  # until the holder has written its name
        with suppress(OSError, ValueError):
            if holder := json.loads(self.path.read_text()):
                who = f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"
        return f"{self.path.parent} is in use by {who}; wait for it to finish or use another folder"


def check_folder(folder: Path, task: str, resume: bool, overwrite: bool, run_dir_given: bool) -> str:
    """What a command may do in `folder` before anything is written: 'new', 'resume', 'overwrite' or 'restart'
    (only the log and config of a run that ended before its first checkpoint: moved aside, started anew there).
    Raises UserError, naming the way out, for another run's record that is neither resumed nor overwritten."""
    record = [name for name in RECORD_FILES if (folder / name).exists()]
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
    """Move the run in `folder` into folder/previous/<time>/ (overwritten, or ended before its first checkpoint)."""
    target = folder / "previous" / time.strftime("%Y-%m-%d_%H-%M-%S")
    target.mkdir(parents=True)
    for entry in folder.iterdir():
        if entry.name not in ("previous", LOCK_NAME):
            shutil.move(str(entry), str(target / entry.name))
    log.warning(said.format(folder=folder, target=target))
    return target


def append_resume(folder: Path, overrides: list[str], epoch: int, step: int) -> None:
    """Add what this resume ran with to RUN/resumes.yaml (the original .hydra/config.yaml is kept)."""
    entry = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "from_epoch": epoch,
        "from_step": step,
        "overrides": list(overrides),
    }
    with open(folder / "resumes.yaml", "a") as f:
        yaml.safe_dump([entry], f, sort_keys=False)


def discard_new_folder(folder: Path, created: bool) -> None:
    """After a refused command: remove what it wrote into `folder` (Hydra's files, the lock), and the
    folder itself and its empty parents if this command created it. Anything else stays."""
    if not folder.is_dir() or not {p.name for p in folder.iterdir()} <= HYDRA_FILES:
        return  # gone, or a run's files are there: keep everything
    if not created:  # the user's own (empty) folder: remove only what this command wrote
        shutil.rmtree(folder / ".hydra", ignore_errors=True)
        (folder / "main.log").unlink(missing_ok=True)
        return
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent.name in ("", "."):  # the root, or the working folder
            break
        try:
            parent.rmdir()  # an empty one only
        except OSError:
            break
        if parent.name in ("outputs", "multirun"):
            break
