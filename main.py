"""RegToMe research CLI: python main.py task=train|eval|benchmark|visualize [overrides]. See README.md."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data import DatasetError
from engine.distributed import cleanup
from engine.errors import UserError
from engine.run_dir import run_id

OmegaConf.register_new_resolver("run_id", run_id, replace=True)
CONFIGS = Path(__file__).resolve().parent / "configs"
HINTS = {"dataset": "; for your own images use dataset=imagefolder dataset.root=DIR",
         "model": "; or keep a preset and set model.name=<any timm ViT>"}


def check_group_choices(argv: list[str]) -> None:
    """A one-line error for `dataset=mnist`-style typos (sweeps too), before Hydra's multi-line one."""
    for arg in argv:
        group, _, value = arg.partition("=")
        folder = CONFIGS / group
        if not value or group.startswith(("+", "~", "hydra")) or not folder.is_dir():
            continue
        options = sorted(p.stem for p in folder.glob("*.yaml"))
        for choice in value.split(","):
            if choice != "null" and choice not in options:
                print(f"error: unknown {group} {choice!r}; choose one of {', '.join(options)}{HINTS.get(group, '')}",
                      file=sys.stderr)
                sys.exit(2)


check_group_choices(sys.argv[1:])

if {"-m", "--multirun"} & set(sys.argv):
    # Jobs a launcher submits (SLURM) resolve hydra.sweep.dir again: they inherit this id to share it.
    os.environ.setdefault("REGTOME_RUN_ID", run_id())

if int(os.environ.get("RANK", "0")) > 0:
    # Under torchrun only rank 0 writes: the other ranks share its run directory but leave no files.
    sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def dispatch(task: str):
    if task == "train":
        from engine.train import run
    elif task == "eval":
        from engine.evaluate import run
    elif task == "benchmark":
        from engine.benchmark import run
    elif task == "visualize":
        from engine.visualize import run
    else:
        raise UserError(f"unknown task {task!r}; use task=train, eval, benchmark or visualize")
    return run


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        dispatch(cfg.task)(cfg, run_dir, list(hydra_cfg.overrides.task))
        cleanup()
    except (UserError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Exception as err:
        from engine.train import TrainingInterrupted

        if isinstance(err, TrainingInterrupted):
            print(err, file=sys.stderr)
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
