"""RegToMe research CLI: python main.py task=train|eval|benchmark|visualize|export [overrides]. See README.md.

This file only composes and dispatches: `engine.cli.claim` checks the command line and claims the run
folder, Hydra composes the config, and `engine.task_table.TASKS` names the module that runs the task.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from engine.cli import claim
from engine.errors import RunStopped, TrainingInterrupted, UserError, one_line
from engine.run.console import log_ending, say_ending, survive_closed_console
from engine.run.folder_claim import discard_new_folder
from engine.task_table import runner

CONFIGS = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="config")
def main(cfg: DictConfig) -> None:
    from data import DatasetError  # torch and torchvision load here, after the command line passed
    from engine.run.distributed import cleanup

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    created = claim.CLAIM.created if claim.CLAIM.folder is not None else True
    interrupted = False
    try:
        claim.claim_job_folder(run_dir, cfg)
        runner(cfg.task)(cfg, run_dir, list(HydraConfig.get().overrides.task))
    except (UserError, DatasetError, MissingMandatoryValue) as err:
        log_ending(claim.report_error(err))
        claim.release()
        discard_new_folder(run_dir, created)
        sys.exit(2)
    except RunStopped as err:  # interrupted (last.pt saved) or a checkpoint that could not be written
        say_ending(str(err), logging.WARNING if isinstance(err, TrainingInterrupted) else logging.ERROR)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops cleanly by itself)
        interrupted = True
    except Exception as err:  # a bug: Hydra prints the traceback; main.log keeps it, and says so last
        log_ending(f"{traceback.format_exc().rstrip()}\ncrashed: {type(err).__name__}: {one_line(err)}")
        raise
    finally:
        claim.release()
        cleanup()
    if interrupted:  # out of the except block: the task's frames, and its loaders, are gone
        signal.signal(signal.SIGINT, _stop_at_once)
        gc.collect()  # loader workers shut down in order, not killed mid-transfer at exit
        discard_new_folder(run_dir, created)
        kept = f"what it had written is in {run_dir}" if run_dir.exists() else "nothing was kept"
        line = f"interrupted by Ctrl-C (SIGINT) during task={cfg.task}; {kept}"
        print(line, file=sys.stderr)
        log_ending(line, logging.WARNING)
        sys.exit(128 + signal.SIGINT)


def _stop_at_once(signum: int, frame: object) -> None:
    """A second Ctrl-C while the first is handled: stop now, still without a traceback."""
    os._exit(128 + signum)


def run_cli(argv: list[str]) -> None:
    """Check the command line and claim the run folder, then hand over to Hydra."""
    try:
        sys.argv = [sys.argv[0], *claim.prepare(argv, CONFIGS)]
        main()
    except UserError as err:
        claim.report_error(err)
        sys.exit(2)
    except KeyboardInterrupt:  # before a task started (Hydra setting up, a sweep launching)
        signal.signal(signal.SIGINT, _stop_at_once)
        claim.release()
        if claim.CLAIM.folder is not None:
            discard_new_folder(claim.CLAIM.folder, claim.CLAIM.created)
        print("interrupted by Ctrl-C (SIGINT) before the task started; nothing was kept", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


if __name__ == "__main__":
    survive_closed_console()  # `| tee` killed by Ctrl-C, a closed terminal: writes fail, the run goes on
    logging.raiseExceptions = False  # a full disk under main.log is said once, not as a traceback per line
    run_cli(sys.argv[1:])
