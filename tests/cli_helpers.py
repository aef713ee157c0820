"""Run main.py as a user would (a subprocess) or compose its config in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]

# A tiny model on synthetic data, on the CPU: a 2-epoch run takes a few seconds.
SMOKE = [
    "dataset=synthetic", "model=vit_tiny_test", "trainer.device=cpu", "trainer.amp=off",
    "trainer.num_workers=0", "trainer.batch_size=32", "trainer.warmup_epochs=0", "trainer.lr=1e-3",
    "tome.r=2", "seed=0",
]


def run_main(*overrides: str, cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"main.py {' '.join(overrides)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def compose_config(*overrides: str) -> DictConfig:
    from engine.run_dir import run_id
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("run_id", run_id, replace=True)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def max_weight_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
