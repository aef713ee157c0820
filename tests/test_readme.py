"""The README's quick start, line by line and in order, on tiny generated data: the README cannot drift from
the code. Each line runs as written; the test appends only what makes it small and offline (a tiny model,
a few steps, the CPU), and gives the placeholders DIR and RUN their folders."""

from pathlib import Path

import pytest
from cli_helpers import ROOT, results, run_main, write_cifar, write_image_folder

SMALL = ["runtime.device=cpu", "runtime.num_workers=0"]
SHORT = ["trainer.epochs=1", "trainer.max_steps_per_epoch=2", "trainer.batch_size=8", "trainer.warmup_epochs=0"]
TINY_HF = [
    "model.img_size=32",
    "model.architecture.hidden_size=32",
    "model.architecture.num_hidden_layers=2",
    "model.architecture.num_attention_heads=2",
    "model.architecture.patch_size=8",
]


def quick_start() -> list[list[str]]:
    """The `python main.py` lines of the README's quick start, as argument lists."""
    section = (ROOT / "README.md").read_text().split("## The CLI in five minutes", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].split() for line in block.splitlines() if line.startswith("python main.py")]
    return [command[2:] for command in commands]


@pytest.fixture
def offline_cifar(monkeypatch):
    """Batch files in torchvision's format cannot match the real md5 sums: check presence instead."""
    import os

    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.slow
def test_the_quick_start_runs_line_by_line(tmp_path: Path, offline_cifar):
    lines = quick_start()
    assert [line[0] for line in lines] == ["task=train", "task=train", "task=train", "task=eval", "task=export"]
    main_job, own_images, hugging_face, evaluate, export = lines
    assert (
        "dataset=cifar10" in main_job and "dataset.root=DIR" in own_images and "model.pretrained=false" in hugging_face
    )

    write_cifar(tmp_path / "datasets" / "CIFAR10", "cifar10")  # where the main job downloads to
    run_main(*main_job, "model=vit_tiny_test", *SHORT, *SMALL, f"hydra.run.dir={tmp_path / 'cifar'}", cwd=tmp_path)
    assert results(tmp_path / "cifar")["dataset"] == "cifar10"

    folder = write_image_folder(tmp_path / "pets", {"train": 8, "val": 2}, size=32)
    run = tmp_path / "images"
    place = {"DIR": str(folder), "RUN": str(run)}
    fill = [[arg.replace("DIR", place["DIR"]) if "=DIR" in arg else arg for arg in line] for line in lines]
    run_main(*fill[1], "model=vit_tiny_test", *SHORT, *SMALL, f"hydra.run.dir={run}", cwd=tmp_path)
    assert results(run)["dataset"] == "imagefolder"

    run_main(*fill[2], *TINY_HF, *SHORT, *SMALL, f"hydra.run.dir={tmp_path / 'hf'}", cwd=tmp_path)
    assert results(tmp_path / "hf")["model"].startswith("hf-facebook--dinov2-with-registers-small")

    for line, name in ((evaluate, "eval"), (export, "export")):
        args = [arg.replace("RUN", place["RUN"]) for arg in line]
        extra = ["export.samples=8"] if name == "export" else []
        run_main(*args, *SMALL, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
    assert results(tmp_path / "eval")["protect"] == "prefix" and results(tmp_path / "eval")["r"] == 16
    assert (tmp_path / "export" / "model.onnx").exists()
