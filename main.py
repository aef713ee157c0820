"""RegToMe research CLI: python main.py task=train|eval|benchmark|visualize [overrides]. See README.md."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from data import DatasetError
from engine.cli import check_command_line, discard_empty_run_dir, register_resolvers, report_error
from engine.distributed import cleanup
from engine.errors import TrainingInterrupted, UserError

TASKS = ("train", "eval", "benchmark", "visualize")


def task_runner(task: str) -> Callable:
    if task == "train":
        from engine.train import run
    elif task == "eval":
        from engine.evaluate import run
    elif task == "benchmark":
        from engine.benchmark import run
    elif task == "visualize":
        from engine.visualize import run
    else:
        raise UserError(f"unknown task {task!r}; use task={', '.join(TASKS)}")
    return run


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        task_runner(cfg.task)(cfg, run_dir, list(HydraConfig.get().overrides.task))
    except (UserError, DatasetError, MissingMandatoryValue) as err:
        report_error(err)
        discard_empty_run_dir(run_dir)
        sys.exit(2)
    except TrainingInterrupted as err:
        print(err, file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        cleanup()


def cli(argv: list[str]) -> None:
    """Check the command line, prepare what Hydra's config needs, then hand over to Hydra."""
    problem = check_command_line(argv, Path(__file__).resolve().parent / "configs", TASKS)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    register_resolvers()
    if {"-m", "--multirun"} & set(argv):
        from engine.run_dir import run_id

        # Jobs a launcher submits (SLURM) resolve hydra.sweep.dir again: they inherit this id to share it.
        os.environ.setdefault("REGTOME_RUN_ID", run_id())
    if int(os.environ.get("RANK", "0")) > 0:
        # Under torchrun only rank 0 writes: the other ranks share its run directory but leave no files.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    main()


if __name__ == "__main__":
    cli(sys.argv[1:])
