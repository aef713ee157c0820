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
    "dataset=synthetic", "model=vit_tiny_test", "runtime.device=cpu", "runtime.amp=off",
    "runtime.num_workers=0", "trainer.batch_size=32", "trainer.warmup_epochs=0", "trainer.lr=1e-3",
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


def write_image_folder(root: Path, splits: dict[str, int], num_classes: int = 4, size: int = 32,
                       seed: int = 0) -> Path:
    """An ImageFolder tree root/<split>/<class>/<i>.png of noisy images with a class colour (learnable)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (num_classes, 3))
    for split, per_class in splits.items():
        for c in range(num_classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.normal(0, 40, (size, size, 3))
                pixels = np.clip(colours[c] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root
