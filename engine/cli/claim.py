"""What main.py does around Hydra: check the command line, claim the run folder, name it, report errors. The
order keeps the record honest: every key and value is checked (`command_line`), then the run folder is claimed
(`engine.run.folder_claim`: a lock, the rules for resuming or overwriting), and only then does Hydra write into it."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from ..errors import UserError, one_line
from ..run.folder_claim import RunLock, check_folder, discard_new_folder, move_aside, run_id
from ..task_table import TASKS
from .command_line import check_command_line


@dataclass
class Claim:
    """The run folder this process works in (single runs), and whether this command created it."""

    folder: Optional[Path] = None
    created: bool = False
    lock: Optional[RunLock] = None


CLAIM = Claim()  # the claim of this process (main.py's single run)
RESTARTED = "{folder} held a run that stopped before its first checkpoint; its files are now in {target}"


def prepare(argv: list[str], configs: Path) -> list[str]:
    """Returns the arguments for Hydra, or raises UserError (nothing written anywhere)."""
    register_resolvers()
    checked = check_command_line(argv, configs)
    cfg = checked.cfg
    if checked.multirun:
        # Jobs a launcher submits (SLURM) resolve hydra.sweep.dir again: they inherit this id to share it.
        os.environ.setdefault("REGTOME_RUN_ID", run_id())
    hydra_argv = list(checked.argv)
    if not owns_the_folder():
        # Under torchrun only rank 0 writes: the other ranks share its run directory but leave no files.
        return hydra_argv + ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if checked.multirun or not checked.runs:
        return hydra_argv  # each job of a sweep claims its own folder when it starts (`claim_job_folder`)
    try:  # the folder of this single run, resolved as Hydra will
        folder = Path(str(OmegaConf.select(cfg, "hydra.run.dir")))
    except Exception:  # an interpolation that only Hydra's runtime resolves: let Hydra decide
        return hydra_argv
    created = not folder.exists()
    lock = RunLock(folder).acquire()  # first: a second process is told who holds the folder
    run_dir_given = any(arg.lstrip("+").startswith("hydra.run.dir=") for arg in argv)
    try:
        mode = check_folder(folder, cfg.task, cfg.trainer.resume, cfg.trainer.overwrite, run_dir_given)
    except UserError:
        lock.release()
        discard_new_folder(folder, created)
        raise
    CLAIM.folder, CLAIM.created, CLAIM.lock = folder, created, lock
    if mode == "overwrite":
        move_aside(folder)
    if mode == "restart":
        move_aside(folder, RESTARTED)
    hydra_argv.append(f"hydra.run.dir={folder}")  # exactly the folder that was checked and locked
    if mode == "resume":
        hydra_argv.append("hydra.output_subdir=null")  # the run's .hydra/ keeps the config it started with
    return hydra_argv


def claim_job_folder(folder: Path) -> None:
    """A job of a sweep (or a requeued SLURM job) locks its own folder when it starts."""
    if CLAIM.lock is None and owns_the_folder():
        CLAIM.folder, CLAIM.lock = folder, RunLock(folder).acquire()


def owns_the_folder() -> bool:
    """Whether this process may write, remove or unlock the run folder: rank 0 of torchrun (or SLURM's tasks),
    or the only process. The other ranks share its folder and leave it alone, whatever ends them."""
    from ..run.runtime import launch_rank  # torch: imported when asked, after the command line passed

    return launch_rank() == 0


def release() -> None:
    """Give the lock back (each job of a sweep run in one process takes and releases its own)."""
    if CLAIM.lock is not None:
        CLAIM.lock.release()
        CLAIM.lock = None


def register_resolvers() -> None:
    """${run_id:} and ${run_name:} for hydra.run.dir and hydra.sweep.dir (Hydra carries them into SLURM jobs)."""
    OmegaConf.register_new_resolver("run_id", run_id, replace=True)
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)


def run_name(_root_: DictConfig) -> str:
    """'<dataset>_<model label>' of what the run builds: with ckpt=PATH, the checkpoint's data set and model;
    visualize and export with images=PATH: 'images_<model label>'."""
    from ..models.build import model_label

    saved = _saved_config(_root_.ckpt) if _root_.ckpt else {}
    dataset, model = saved.get("dataset", _root_.dataset), saved.get("model", _root_.model)  # saved may predate them
    data_name = "images" if _root_.images and TASKS[_root_.task].reads_images else dataset["name"]
    try:
        return f"{data_name}_{model_label(model)}"
    except Exception:  # an incomplete model group: the task reports it; the folder keeps the plain name
        return f"{data_name}_{model['name']}"


@functools.lru_cache(maxsize=4)
def _saved_config(path: str) -> dict[str, Any]:
    """The config inside a checkpoint (memory-mapped: its tensors are not read), or {}."""
    from ..run.checkpoint import read_checkpoint  # torch: only with ckpt=

    try:
        return OmegaConf.to_container(read_checkpoint(path, mmap=True).config)
    except Exception:  # a bad checkpoint is reported by the task itself
        return {}


def report_error(err: BaseException) -> str:
    """Print the one-line error on stderr; returns the line (for the run's main.log)."""
    line = f"error: {one_line(err)}"
    print(line, file=sys.stderr)
    return line
