"""RegToMe research CLI: python main.py task=train|eval|benchmark|visualize|export [overrides]. See README.md.

This file only composes and dispatches: `engine.cli.claim` checks the command line and claims the run
folder, Hydra composes the config, and `engine.tasks.TASKS` names the module that runs the task.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from engine.cli import claim
from engine.errors import TrainingInterrupted, UserError
from engine.run.folder_claim import discard_new_folder
from engine.tasks import runner

CONFIGS = Path(__file__).resolve().parent / "configs"


@hydra.main(version_base="1.3", config_path=str(CONFIGS), config_name="config")
def main(cfg: DictConfig) -> None:
    from data import DatasetError  # torch and torchvision load here, after the command line passed
    from engine.run.distributed import cleanup

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    created = claim.CLAIM.created if claim.CLAIM.folder is not None else True
    try:
        claim.claim_job_folder(run_dir, cfg)
        runner(cfg.task)(cfg, run_dir, list(HydraConfig.get().overrides.task))
    except (UserError, DatasetError, MissingMandatoryValue) as err:
        claim.report_error(err)
        claim.release()
        discard_new_folder(run_dir, created)
        sys.exit(2)
    except TrainingInterrupted as err:
        print(err, file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        claim.release()
        cleanup()


def run_cli(argv: list[str]) -> None:
    """Check the command line and claim the run folder, then hand over to Hydra."""
    try:
        sys.argv = [sys.argv[0], *claim.prepare(argv, CONFIGS)]
    except UserError as err:
        claim.report_error(err)
        sys.exit(2)
    main()


if __name__ == "__main__":
    run_cli(sys.argv[1:])
