"""Run main.py as a user would (a subprocess) or compose its config in-process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]

# A tiny model on synthetic data, on the CPU: a 2-epoch run takes a few seconds.
SMOKE = [
    "dataset=synthetic",
    "model=vit_tiny_test",
    "runtime.device=cpu",
    "runtime.amp=off",
    "runtime.num_workers=0",
    "trainer.batch_size=32",
    "trainer.warmup_epochs=0",
    "trainer.lr=1e-3",
    "tome.r=2",
    "seed=0",
]


def run_main(*overrides: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`python main.py OVERRIDES` in `cwd`: its exit code, stdout and stderr.

    It runs in this test process (the same code path from the command line on, without paying torch's
    and timm's imports again, which dominate a tiny run). What only a real process shows (the lock
    race, signals, torchrun) is tested by starting one.
    """
    result = _run_main_in_process(list(overrides), Path(cwd))
    if check and result.returncode != 0:
        raise AssertionError(f"main.py {' '.join(overrides)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def _run_main_in_process(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """main.run_cli(argv) as its own process would run it, with every global it touches put back."""
    import contextlib
    import io
    import logging
    import signal
    import traceback

    import torch
    from hydra.core.global_hydra import GlobalHydra

    import main
    from engine.cli import claim as cli

    stdout, stderr = io.StringIO(), io.StringIO()
    saved = (
        os.getcwd(),
        dict(os.environ),
        list(sys.argv),
        torch.get_num_threads(),
        {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)},
        torch.random.get_rng_state(),
    )
    root_logger = logging.getLogger()
    saved_logging = (list(root_logger.handlers), root_logger.level)
    code = 0
    os.chdir(cwd)
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main.run_cli(argv)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
            except BaseException:  # what the interpreter would print before exiting 1
                traceback.print_exc()
                code = 1
    finally:
        GlobalHydra.instance().clear()
        cli.release()
        cli.CLAIM.__init__()
        os.chdir(saved[0])
        os.environ.clear()
        os.environ.update(saved[1])
        sys.argv[:] = saved[2]
        torch.set_num_threads(saved[3])
        for signum, handler in saved[4].items():
            signal.signal(signum, handler)
        torch.random.set_rng_state(saved[5])
        for handler in root_logger.handlers:
            if handler not in saved_logging[0]:
                handler.close()
        root_logger.handlers[:] = saved_logging[0]
        root_logger.setLevel(saved_logging[1])
    return subprocess.CompletedProcess(["main.py", *argv], code, stdout.getvalue(), stderr.getvalue())


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line a refused or failed run printed, with no traceback beside it."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def last_line(path) -> str:
    """main.log's last line, without the logging prefix ('[time][logger][LEVEL] - ')."""
    line = [line for line in path.read_text().splitlines() if line.strip()][-1]
    return re.sub(r"^\[[^]]*\]\[[^]]*\]\[[A-Z]+\] - ", "", line)


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def compose_config(*overrides: str) -> DictConfig:
    from omegaconf import OmegaConf

    from engine.run.folder_claim import run_id
    from engine.schema import plain, register

    register()
    OmegaConf.register_new_resolver("run_id", run_id, replace=True)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return plain(compose(config_name="config", overrides=list(overrides)))


def max_weight_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def write_image_folder(root: Path, splits: dict[str, int], num_classes: int = 4, size: int = 32, seed: int = 0) -> Path:
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


def write_cifar(root: Path, name: str, per_file: int = 6) -> dict:
    """Batch files exactly as torchvision's CIFAR classes read them (pickled dicts of uint8 rows)."""
    cifar100 = name == "cifar100"
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)
    files = ["train", "test"] if cifar100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    written = {}
    for file in files:
        data = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100 if cifar100 else 10, per_file)]
        entry = {"data": data, ("fine_labels" if cifar100 else "labels"): labels}
        (folder / file).write_bytes(pickle.dumps(entry))
        written[file] = (data, labels)
    meta_name, key, count = ("meta", "fine_label_names", 100) if cifar100 else ("batches.meta", "label_names", 10)
    (folder / meta_name).write_bytes(pickle.dumps({key: [f"class{i}" for i in range(count)]}))
    return written
