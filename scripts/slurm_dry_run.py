"""Print the sbatch script Hydra's submitit launcher would submit, without submitting anything.

    python scripts/slurm_dry_run.py hydra.launcher.partition=gpu hydra.launcher.nodes=2 task=train

It goes through submitit's public API as the launcher plugin does (AutoExecutor, update_parameters,
submit), with stand-ins for SLURM's `srun` and `sbatch` on PATH: the `sbatch` stand-in keeps the
script it is given instead of queueing it.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # engine/, data/: beside scripts/, not installed
from engine.cli.claim import register_resolvers
from engine.schema import register

ROOT = Path(__file__).resolve().parents[1]
FAKE_SBATCH = """#!/bin/sh
# keep the script (the last argument) and answer as sbatch does
cp "$(eval echo \\${$#})" "{keep}"
echo "Submitted batch job 0"
"""


def _stand_ins(folder: Path, keep: Path) -> None:
    for name, text in (("srun", "#!/bin/sh\nexit 0\n"), ("sbatch", FAKE_SBATCH.replace("{keep}", str(keep)))):
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def render_sbatch(overrides: list[str]) -> str:
    """The sbatch script for the composed hydra.launcher (hydra/launcher=slurm plus `overrides`)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    register_resolvers()
    register()  # the typed schema configs/config.yaml starts from
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    OmegaConf.update(cfg, "hydra.job.name", "main", force_add=True)  # known only inside a running job
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        keep = tmp_path / "job.sbatch"
        _stand_ins(tmp_path, keep)
        old_path = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{tmp_path}{os.pathsep}{old_path}"
        try:
            # the same translation as hydra_submitit_launcher: generic keys as they are, the rest slurm_*
            executor = submitit.AutoExecutor(
                folder=str(tmp_path / "submitit"), cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
            )
            folder = params.pop("submitit_folder")
            generic = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()})
            executor.submit(print, "dry run")
        finally:
            os.environ["PATH"] = old_path
        return keep.read_text().replace(str(tmp_path / "submitit"), folder)


if __name__ == "__main__":
    print(render_sbatch(sys.argv[1:]))
