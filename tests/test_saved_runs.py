"""A checkpoint is read in one place, and every record says what ran (issue 39): the r that ran and the
preprocessing in the record of every task; the weights by one EMA rule (init_from too); a checkpoint's class
order for any class-folder data set; a finished run's resume; a file that is not a checkpoint; a bug in
visualize is a traceback."""

from __future__ import annotations

import ast
import csv
import json
import runpy
import shutil
import sys

import pytest
from cli_helpers import (
    ROOT,
    SMOKE,
    compose_config,
    error_line,
    last_line,
    max_weight_difference,
    results,
    run_main,
    write_image_folder,
)

from engine.models.tome_group import compact
from engine.run.checkpoint import load_checkpoint

FOLDER = [o for o in SMOKE if not o.startswith(("tome.r=", "dataset="))] + [
    "dataset=imagefolder",
    "dataset.native_size=32",
]
PIPELINE_KEYS = {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}  # timm's validate.py's


@pytest.fixture(scope="module")
def budget(tmp_path_factory):
    """One epoch on a real image folder, r chosen by a FLOP budget (tome.flops), with an EMA of the weights."""
    work = tmp_path_factory.mktemp("saved_runs")
    data = write_image_folder(work / "data", {"train": 8, "val": 4})
    run = work / "train"
    train = [
        *FOLDER,
        f"dataset.root={data}",
        "tome.flops=0.9",
        "trainer.ema=true",
        "trainer.epochs=1",
        "trainer.batch_size=8",  # 4 updates: the EMA is no longer a copy of the weights (timm copies at first)
    ]
    run_main("task=train", *train, f"hydra.run.dir={run}", cwd=work)
    return work, data, run


@pytest.fixture(scope="module")
def records(budget):
    """results.json (visualize.json) of eval, export, visualize and benchmark of the budget run's checkpoint."""
    work, data, run = budget
    ckpt = f"ckpt={run / 'checkpoints' / 'best.pt'}"
    cpu = ["runtime.device=cpu", "runtime.num_workers=0"]
    tasks = {
        "eval": [*cpu, ckpt],
        "export": [*cpu, ckpt, "export.format=torch_export", "export.samples=4"],
        "visualize": [*cpu, ckpt, "visualize.num_samples=1", "visualize.dense_features=false", "visualize.blocks=[0]"],
        "benchmark": [*FOLDER, f"dataset.root={data}", "tome.flops=0.9", "benchmark.r=[0]", "benchmark.quick=false"]
        + ["benchmark.batch_sizes=[1]", "benchmark.repeats=1", "benchmark.iters=1", "benchmark.warmup=0"]
        + ["benchmark.train_step=false", "benchmark.dense=false", "benchmark.loader=false"],
    }
    out = {"train": results(run)}
    for task, args in tasks.items():
        folder = work / task
        run_main(f"task={task}", *args, f"hydra.run.dir={folder}", cwd=work)
        out[task] = json.loads((folder / ("visualize.json" if task == "visualize" else "results.json")).read_text())
    return out


@pytest.mark.slow
def test_every_task_records_the_r_that_ran_and_the_tokens_from_the_same_count(records):
    trained = records["train"]
    assert trained["flops_fraction"] == 0.9 and trained["r"] not in (None, 0)  # the budget chose it
    for task in ("eval", "export", "visualize"):
        ran = {k: records[task][k] for k in ("r", "r_per_block", "tokens_per_block", "protect")}
        assert ran == {k: trained[k] for k in ran}, task
    unmerged = records["benchmark"]["schedules"]["0"]  # benchmark.r=[0]: each timed schedule as it ran
    assert (unmerged["r_per_block"], unmerged["tokens_per_block"]) == ([0, 0], [21, 21])  # 16 + 4 + 1, no merging


@pytest.mark.slow
def test_every_task_records_the_preprocessing_the_images_went_through(records):
    """An image folder of 32 px images at 32 px: taken whole (crop_pct 1.0), normalised as the model says."""
    pipeline = records["train"]["preprocessing"]
    assert PIPELINE_KEYS <= set(pipeline) and pipeline["input_size"] == [3, 32, 32]
    assert (pipeline["crop_pct"], pipeline["crop_mode"], pipeline["native_size"]) == (1.0, "center", 32)
    assert len(pipeline["mean"]) == len(pipeline["std"]) == 3 and pipeline["interpolation"] == "bicubic"
    for task in ("eval", "export", "visualize", "benchmark"):
        assert records[task]["preprocessing"] == pipeline, task


@pytest.mark.slow
def test_the_result_line_prints_the_r_the_cap_applied(budget):
    work, _, run = budget
    folder = work / "capped"
    ckpt = f"ckpt={run / 'checkpoints' / 'best.pt'}"
    run_main("task=eval", ckpt, "tome.r=1000", "runtime.device=cpu", f"hydra.run.dir={folder}", cwd=work)
    record = results(folder)
    assert record["r"] == 1000 and record["r_per_block"] != record["r_requested_per_block"]
    assert f"r={compact(record['r_per_block'])} (capped; asked 1000)" in (folder / "main.log").read_text()


@pytest.mark.slow
def test_register_fate_reads_a_checkpoint_trained_under_a_flop_budget(budget, tmp_path, monkeypatch):
    _, data, run = budget
    script = str(ROOT / "scripts" / "register_fate.py")
    args = [str(run / "checkpoints" / "best.pt"), "--r", "2", "--samples", "4", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", [script, *args, "--out", str(tmp_path)])
    runpy.run_path(script, run_name="__main__")
    summary = json.loads((tmp_path / "register_fate.json").read_text())
    assert summary["r"] == 2 and summary["protect"] == "class" and summary["r_per_block"] == [2, 2]
    assert summary["tokens_per_block"] == [19, 17]  # 16 patches + 4 registers + class, 2 merged per block


def test_nothing_below_the_entry_imports_the_command_line():
    """engine/cli/ is the entry (command line, folder claim): no other engine module imports it. Every import
    form counts: `from ..cli.x import y`, `from .. import cli`, `import engine.cli.x`, `from engine.cli import x`."""
    paths = [path for path in (ROOT / "engine").rglob("*.py") if "cli" not in path.relative_to(ROOT / "engine").parts]
    assert len(paths) > 20
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" if node.module else a.name for a in node.names]
                names += [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            bad = [n for n in names if n == "cli" or n.startswith(("cli.", "engine.cli")) or ".cli." in f"{n}."]
            assert not bad, f"{path.name}:{node.lineno} imports {bad}"


@pytest.mark.slow  # the budget run trains first
def test_init_from_takes_the_weights_eval_takes(budget):
    """One rule for EMA or plain weights: trainer.init_from starts from the EMA's, as eval evaluates them."""
    from engine.training.setup import initial_weights

    _, _, run = budget
    ckpt = run / "checkpoints" / "best.pt"
    saved = load_checkpoint(ckpt)
    assert max_weight_difference(saved["ema"], saved["model"]) > 0
    weights = initial_weights(compose_config("task=train", *SMOKE, f"trainer.init_from={ckpt}"))
    assert max_weight_difference(weights, saved["ema"]) == 0


@pytest.mark.slow
def test_a_checkpoints_class_order_holds_for_dataset_imagenet(budget, tmp_path):
    """val/ of class_1 and class_3 alone, as dataset=imagenet without train/: labels are the checkpoint's."""
    work, data, run = budget
    val_only = tmp_path / "imagenet"
    for name in ("class_1", "class_3"):
        shutil.copytree(data / "val" / name, val_only / "val" / name)
    folder = tmp_path / "eval"
    dataset = ["dataset=imagenet", f"dataset.root={val_only}", "dataset.num_classes=4", "dataset.native_size=32"]
    ckpt = f"ckpt={run / 'checkpoints' / 'best.pt'}"
    run_main("task=eval", ckpt, *dataset, "runtime.device=cpu", f"hydra.run.dir={folder}", cwd=tmp_path)
    with open(folder / "predictions.csv") as f:
        targets = {int(row["target"]) for row in csv.DictReader(f)}
    assert targets == {1, 3}


def folder_files(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # the budget run trains first
def test_resuming_a_finished_run_says_so_and_changes_nothing(budget):
    """Not an error (exit 0: a script that resumes whatever it finds is done), and not a resume."""
    work, _, run = budget
    before = {k: v for k, v in folder_files(run).items() if k != "main.log"}
    result = run_main("task=train", *FOLDER, "trainer.resume=true", f"hydra.run.dir={run}", cwd=work)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    said = (
        f"the run in {run} finished its 1 epochs (trainer.epochs=1): nothing to resume, nothing changed; to train "
        "it longer, add trainer.epochs=N with N > 1"
    )
    assert last_line(run / "main.log") == said and "resumed from" not in (run / "main.log").read_text()
    assert {k: v for k, v in folder_files(run).items() if k != "main.log"} == before


@pytest.mark.slow
def test_resumes_yaml_counts_epochs_as_main_log_does(budget, tmp_path):
    work, _, run = budget
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    run_main("task=train", *FOLDER, "trainer.resume=true", "trainer.epochs=2", f"hydra.run.dir={copy}", cwd=work)
    assert "resumed from epoch 2 step 0" in (copy / "main.log").read_text()
    assert "  from_epoch: 2\n  from_step: 0\n" in (copy / "resumes.yaml").read_text()


def test_a_text_file_given_as_a_checkpoint_is_not_a_checkpoint(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("training notes, not weights\n")
    result = run_main(
        "task=eval", *SMOKE, f"ckpt={notes}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert error_line(result).startswith(f"error: {notes} is not a checkpoint (torch.save writes a zip archive")
    assert not (tmp_path / "run").exists()


def test_a_type_error_inside_visualize_is_a_bug_with_its_traceback(tmp_path, monkeypatch):
    """Only a model whose blocks prefix_attention does not read gets the note instead of the rows."""
    from engine.tasks import visualize
    from regtome.patch import prefix

    def broken(*args, **kwargs):
        raise TypeError("a bug in the attention maps")

    monkeypatch.setattr(prefix, "attention_logits", broken)
    overrides = ["visualize.num_samples=1", "visualize.dense_features=false", "visualize.blocks=[0]"]
    cfg = compose_config("task=visualize", *SMOKE, *overrides)
    with pytest.raises(TypeError, match="a bug in the attention maps"):
        visualize.run(cfg, tmp_path, overrides=overrides)


@pytest.mark.parametrize("crop_pct", [0.9, None])  # None: timm's eval transform takes its default
def test_the_preprocessing_record_is_the_transform_that_runs(crop_pct):
    """Images above 64 px go through timm's eval transform: resize to size / crop_pct, centre crop, normalise."""
    import math

    from torchvision import transforms as T

    from data import preprocessing
    from data.transforms import build_transform

    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bilinear"}
    config["crop_pct"] = crop_pct
    record = preprocessing({"name": "imagefolder", "native_size": 224}, config)
    steps = {type(step): step for step in build_transform(config, 224, is_training=False, augment=False).transforms}
    assert steps[T.Resize].size == math.floor(32 / record["crop_pct"])
    assert steps[T.Resize].interpolation.value == record["interpolation"] and record["crop_mode"] == "center"
    assert list(steps[T.CenterCrop].size) == record["input_size"][1:]
    assert steps[T.Normalize].mean.tolist() == record["mean"] and steps[T.Normalize].std.tolist() == record["std"]
