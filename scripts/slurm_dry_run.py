"""Print the sbatch script Hydra's submitit launcher would submit, without submitting anything.

    python scripts/slurm_dry_run.py hydra.launcher.partition=gpu hydra.launcher.nodes=2 task=train
"""
from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine.run_dir import run_id  # noqa: E402


def render_sbatch(overrides: list[str]) -> str:
    """Translate hydra.launcher as the plugin and submitit do, then let submitit write the script.

    (submitit's SlurmExecutor itself refuses to start where there is no srun, so its renaming
    table and script writer are called directly.)
    """
    import inspect

    from submitit.slurm.slurm import SlurmExecutor, _convert_mem, _make_sbatch_string

    OmegaConf.register_new_resolver("run_id", run_id, replace=True)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    OmegaConf.update(cfg, "hydra.job.name", "main", force_add=True)  # only known inside a running job
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    folder = params.pop("submitit_folder")
    renames = SlurmExecutor._equivalence_dict()
    sbatch = {renames.get(k, k): v for k, v in params.items() if v is not None}
    if "mem" in sbatch:
        sbatch["mem"] = _convert_mem(sbatch["mem"])
    accepted = set(inspect.signature(_make_sbatch_string).parameters)
    command = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **{k: v for k, v in sbatch.items() if k in accepted})


if __name__ == "__main__":
    print(render_sbatch(sys.argv[1:]))
