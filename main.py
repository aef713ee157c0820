"""RegToMe research CLI: python main.py task=train|eval|benchmark|visualize|export [overrides]. See README.md.

This file only composes and dispatches: `engine.cli.claim` checks the command line and claims the run
folder, Hydra composes the config, and `engine.task_table.TASKS` names the module that runs the task.
"""

from __future__ import annotations

import gc
import logging
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from engine.cli import claim
from engine.errors import RunStopped, TrainingInterrupted, UserError, one_line, release_frames
from engine.run.console import (
    exit_on_another_signal,
    log_ending,
    say_ending,
    signal_name,
    stop_signals_interrupt,
    survive_closed_console,
)
from engine.run.folder_claim import discard_new_folder
from engine.schema import plain, register, validate
from engine.task_table import TASKS, runner

CONFIGS = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="config")
def main(cfg: DictConfig) -> None:
    from data import DatasetError  # torch and torchvision load here, after the command line passed
    from engine.run.runtime import cleanup

    stop_signals_interrupt()  # also in a sweep's or a SLURM job's process, which may not have run run_cli
    cfg = plain(cfg)  # the schema checked the types at composition; the tasks read plain words and numbers
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    owner = claim.owns_the_folder()  # rank 0: the only process that removes, unlocks or rewrites the folder
    created = claim.CLAIM.created if claim.CLAIM.folder is not None else True
    stopped_by = None
    try:
        validate(cfg)  # each job of a sweep too: the rules between keys, for the values this job got
        claim.claim_job_folder(run_dir)
        if owner or TASKS[cfg.task].ranks:  # a task of one process runs on rank 0 alone
            runner(cfg.task)(cfg, run_dir, list(HydraConfig.get().overrides.task))
    except (UserError, DatasetError, MissingMandatoryValue) as err:
        release_frames(err)  # a loader that raised it shuts its workers down now, not never
        line = claim.report_error(err)
        if owner:
            log_ending(line)
            claim.release()
            discard_new_folder(run_dir, created)
        sys.exit(2)
    except RunStopped as err:  # interrupted (last.pt saved) or a checkpoint that could not be written
        release_frames(err)
        say_ending(str(err), logging.WARNING if isinstance(err, TrainingInterrupted) else logging.ERROR)
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM or SIGHUP outside a training loop (which stops by itself)
        stopped_by = getattr(err, "signum", signal.SIGINT)
    except Exception as err:  # a bug: Hydra prints the traceback; main.log keeps it, and says so last
        log_ending(f"{traceback.format_exc().rstrip()}\ncrashed: {type(err).__name__}: {one_line(err)}")
        release_frames(err)
        raise
    finally:
        claim.release()
        cleanup()
    if stopped_by is not None:  # out of the except block: the task's frames, and its loaders, are gone
        exit_on_another_signal()
        gc.collect()  # loader workers shut down in order, not killed mid-transfer at exit
        if owner:
            discard_new_folder(run_dir, created)
        kept = f"what it had written is in {run_dir}" if run_dir.exists() else "nothing was kept"
        say_ending(f"interrupted by {signal_name(stopped_by)} during task={cfg.task}; {kept}", logging.WARNING)
        sys.exit(128 + stopped_by)


def run_cli(argv: list[str]) -> None:
    """Check the command line and claim the run folder, then hand over to Hydra."""
    stop_signals_interrupt()  # from the first moment: a SIGTERM while the folder is claimed releases it
    try:
        sys.argv = [sys.argv[0], *claim.prepare(argv, CONFIGS)]
        main()
    except UserError as err:
        claim.report_error(err)
        sys.exit(2)
    except KeyboardInterrupt as err:  # before a task started (Hydra setting up, a sweep launching)
        exit_on_another_signal()
        claim.release()
        if claim.CLAIM.folder is not None:
            discard_new_folder(claim.CLAIM.folder, claim.CLAIM.created)
        signum = getattr(err, "signum", signal.SIGINT)
        say_ending(f"interrupted by {signal_name(signum)} before the task started; nothing was kept")
        sys.exit(128 + signum)


register()  # the typed schema configs/config.yaml starts from (Hydra's ConfigStore)

if __name__ == "__main__":
    survive_closed_console()  # `| tee` killed by Ctrl-C, a closed terminal: writes fail, the run goes on
    logging.raiseExceptions = False  # a full disk under main.log is said once, not as a traceback per line
    run_cli(sys.argv[1:])
