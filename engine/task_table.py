"""`TASKS`: the one table from a task's name (``python main.py task=NAME``) to its module in `engine/tasks/` and
what it reads, for main.py and the command-line checks. Importing it loads no torch: a task's module is imported
only when it runs."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Task:
    module: str  # holds run(cfg, run_dir, overrides)
    reads_ckpt: bool = False  # ckpt=PATH: the checkpoint's model, dataset and tome groups are used
    reads_images: bool = False  # images=PATH: an image file or a folder instead of the data set's val split
    ranks: bool = False  # shares its work among torchrun's ranks; a task that does not runs on rank 0 alone


TASKS: dict[str, Task] = {
    # train (and validate) a model; checkpoints and results.json
    "train": Task("engine.tasks.train", ranks=True),
    # accuracy and images/s of a checkpoint or of pretrained weights
    "eval": Task("engine.tasks.evaluate", reads_ckpt=True, ranks=True),
    # speed of merging against the unpatched model, on random input
    "benchmark": Task("engine.tasks.benchmark"),
    # what merging merges and what the prefix tokens attend to
    "visualize": Task("engine.tasks.visualize", reads_ckpt=True, reads_images=True),
    # ONNX or torch.export, checked against PyTorch on real images
    "export": Task("engine.tasks.export", reads_ckpt=True, reads_images=True),
}


def runner(name: str) -> Callable[..., Any]:
    return importlib.import_module(TASKS[name].module).run
