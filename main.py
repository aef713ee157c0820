"""RegToMe research CLI: python main.py task=train|eval|benchmark|visualize|export [overrides]. See README.md."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from engine import cli
from engine.errors import TrainingInterrupted, UserError
from engine.run_folder import discard_new_folder

CONFIGS = Path(__file__).resolve().parent / "configs"


def task_runner(task: str) -> Callable:
    if task == "train":
        from engine.train import run
    elif task == "eval":
        from engine.evaluate import run
    elif task == "benchmark":
        from engine.benchmark import run
    elif task == "visualize":
        from engine.visualize import run
    elif task == "export":
        from engine.export import run
    else:
        raise UserError(f"unknown task {task!r}; use task={', '.join(cli.TASKS)}")
    return run


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="config")
def main(cfg: DictConfig) -> None:
    from data import DatasetError  # torch and torchvision load here, after the command line passed
    from engine.distributed import cleanup

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    created = cli.CLAIM.created if cli.CLAIM.folder is not None else True
    try:
        cli.claim_job_folder(run_dir, cfg)
        task_runner(cfg.task)(cfg, run_dir, list(HydraConfig.get().overrides.task))
    except (UserError, DatasetError, MissingMandatoryValue) as err:
        cli.report_error(err)
        cli.release()
        discard_new_folder(run_dir, created)
        sys.exit(2)
    except TrainingInterrupted as err:
        print(err, file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        cli.release()
        cleanup()


def run_cli(argv: list[str]) -> None:
    """Check the command line and claim the run folder, then hand over to Hydra."""
    try:
        sys.argv = [sys.argv[0], *cli.prepare(argv, CONFIGS)]
    except UserError as err:
        cli.report_error(err)
        sys.exit(2)
    main()


if __name__ == "__main__":
    run_cli(sys.argv[1:])
