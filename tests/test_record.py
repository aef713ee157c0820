"""A run's record tells the truth (issue #22): locked folders, configs written once, keys checked first,
class folders checked, sensible defaults for workers and threads. Run as users run them: main.py in
a subprocess, real image folders, loader workers on, two processes for the lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from cli_helpers import ROOT, SMOKE, compose_config, results, run_main, write_image_folder
from test_mistakes import folder_bytes, one_line_error

from engine.errors import UserError
from engine.run.folder_claim import LOCK_NAME

IMAGES = [o for o in SMOKE if not o.startswith(("dataset", "runtime.num_workers"))] + [
    "dataset=imagefolder",
    "dataset.native_size=32",
    "runtime.num_workers=2",
    "trainer.augment=true",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images") / "data", {"train": 24, "val": 4})


def start(args: list[str], cwd) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.slow
def test_a_second_process_is_refused_while_the_first_trains(tmp_path, folder):
    run_dir = tmp_path / "run"
    first = start(
        ["task=train", *IMAGES, f"dataset.root={folder}", "trainer.epochs=40", f"hydra.run.dir={run_dir}"], tmp_path
    )
    deadline = time.time() + 60
    while not (run_dir / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (run_dir / LOCK_NAME).exists()
    holder = json.loads((run_dir / LOCK_NAME).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
    config_before = (run_dir / ".hydra" / "config.yaml").read_bytes()
    second = run_main(
        "task=train",
        *IMAGES,
        f"dataset.root={folder}",
        "tome.r=8",
        "trainer.resume=true",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        check=False,
    )
    line = one_line_error(second)
    assert f"in use by process {first.pid} on {socket.gethostname()}" in line
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config_before
    assert not (run_dir / LOCK_NAME).exists()  # released on the signal
    assert "tome.r=8" not in (run_dir / "main.log").read_text()
    # the resume command the CLI printed works as printed, and appends to the record instead of rewriting it
    command = err.split("continue with: ")[1].split()
    assert command[:3] == [sys.executable, "main.py", "task=train"]  # the interpreter that ran it (a venv's)
    import torch

    done = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["epoch"]
    resumed = run_main(*command[2:], f"trainer.epochs={done + 1}", cwd=tmp_path)
    assert resumed.returncode == 0
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config_before
    resumes = (run_dir / "resumes.yaml").read_text()
    assert resumes.count("- time:") == 1 and f"trainer.epochs={done + 1}" in resumes
    assert results(run_dir)["epochs"] == done + 1


def test_each_job_of_a_sweep_in_one_process_locks_its_own_folder(tmp_path):
    """Hydra's basic launcher runs a sweep's jobs one after another in one process: each must lock its folder."""
    from engine.cli import claim as cli

    jobs = [tmp_path / "0", tmp_path / "1"]
    try:
        for job in jobs:
            job.mkdir()
            cli.claim_job_folder(job)
            assert json.loads((job / LOCK_NAME).read_text())["pid"] == os.getpid()
            cli.release()
            assert not (job / LOCK_NAME).exists()
    finally:
        cli.release()
        cli.CLAIM.__init__()


@pytest.mark.parametrize(
    "args,message",
    [
        (["trainer.epoch=3"], "error: trainer.epoch is not a key; did you mean trainer.epochs"),
        (["+trainer.epoch=3"], "error: +trainer.epoch: only model.kwargs takes new keys; did you mean trainer.epochs"),
        (["dataset.img_size=32"], "error: dataset.img_size is now dataset.native_size: write dataset.native_size=32"),
        (["trainer.device=cpu"], "error: trainer.device is now runtime.device: write runtime.device=cpu"),
        (["resume=true"], "error: resume is now trainer.resume: write trainer.resume=true"),
        (["model.class_layer=1"], "error: model.class_layer is now tome.class_layer: write tome.class_layer=1"),
        (["tome.protect=registers"], "error: tome.protect=registers: takes one of apart, prefix, class"),
        (
            ["ckpt=x.pt"],
            "error: ckpt is what eval, visualize and export read; to start training from a checkpoint's "
            "weights use trainer.init_from=PATH",
        ),
        (["tome.flops=0.5", "tome.r=4"], "error: tome.r and tome.flops both given"),
        (["tome.r=null"], "error: tome.r is null: set tome.r=INT (or tome.flops=FRACTION"),
        (["tome.flops=1.5"], "error: tome.flops=1.5: takes a fraction in (0, 1]"),
    ],
)
def test_keys_are_checked_before_anything_is_written(tmp_path, args, message):
    line = one_line_error(run_main("task=train", *SMOKE, *args, cwd=tmp_path, check=False))
    assert line.startswith(message), line
    assert list(tmp_path.iterdir()) == []


def test_one_rule_for_r_and_flops_on_the_command_line_in_a_file_and_in_the_builder(tmp_path):
    """tome.r or tome.flops, never both: refused for a config file and for a sweep before any job; the builder
    applies the same rule (one function) to a config it is handed."""
    import shutil

    from engine.cli.command_line import check_command_line
    from engine.models.build import tome_options

    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    (configs / "experiment" / "both.yaml").write_text("# @package _global_\ntome:\n  flops: 0.5\n")
    with pytest.raises(UserError, match=r"^tome.r=8 and tome.flops=0.5 are both set \(in a config file\)"):
        check_command_line(["experiment=both"], configs)
    with pytest.raises(UserError, match="^tome.r and tome.flops both given"):  # any job of the sweep would fail
        check_command_line(["-m", "tome.flops=null,0.5", "tome.r=8"], configs)
    assert "tome.r=null" in check_command_line(["tome.flops=0.5"], configs).argv
    assert "tome.flops=null" in check_command_line(["experiment=both", "tome.r=4"], configs).argv
    options = {"prop_attn": True, "protect": "apart"}
    with pytest.raises(UserError, match="are both set"):
        tome_options({"r": 8, "flops": 0.5, **options})
    with pytest.raises(UserError, match="^tome.r is null"):
        tome_options({"r": None, "flops": None, **options})
    assert tome_options({"r": None, "flops": 0.5, **options})["r"] == 0  # the budget chooses r later
    assert tome_options({"r": [16, -1.0], "flops": None, **options})["r"] == (16, -1.0)


@pytest.mark.slow
def test_an_r_given_to_a_checkpoint_trained_with_a_flop_budget_is_the_r_that_runs(tmp_path):
    smoke = [arg for arg in SMOKE if not arg.startswith("tome.r=")]
    train = tmp_path / "train"
    run_main("task=train", *smoke, "tome.flops=0.9", "trainer.epochs=1", f"hydra.run.dir={train}", cwd=tmp_path)
    budget = json.loads((train / "results.json").read_text())
    assert budget["flops_fraction"] == 0.9 and budget["r"] != 2
    for r, folder in ((2, "r2"), (None, "budget")):
        given = [f"tome.r={r}"] if r is not None else []
        ckpt = f"ckpt={train / 'checkpoints' / 'best.pt'}"
        run_main("task=eval", *smoke, ckpt, *given, f"hydra.run.dir={tmp_path / folder}", cwd=tmp_path)
        record = json.loads((tmp_path / folder / "results.json").read_text())
        assert (record["r"], record["flops_fraction"]) == ((2, None) if r else (budget["r"], 0.9))


def test_every_suggested_key_is_a_key(tmp_path):
    from omegaconf import OmegaConf

    from engine.run.compat import RENAMED

    cfg = compose_config()
    for new in RENAMED.values():
        assert OmegaConf.select(cfg, new, default="absent") != "absent", new
    line = one_line_error(run_main("task=train", *SMOKE, "trainer.wamup_epochs=1", cwd=tmp_path, check=False))
    for suggestion in line.split("did you mean ")[1].rstrip("?").split(" or "):
        assert OmegaConf.select(cfg, suggestion, default="absent") != "absent", suggestion


@pytest.mark.slow
def test_model_kwargs_take_any_timm_argument_with_or_without_plus(tmp_path):
    for spelling in ("model.kwargs.depth=3", "+model.kwargs.depth=3"):
        run_dir = tmp_path / ("plus" if spelling.startswith("+") else "plain")
        run_main(
            "task=train",
            *SMOKE,
            spelling,
            "trainer.epochs=1",
            "trainer.max_steps_per_epoch=1",
            f"hydra.run.dir={run_dir}",
            cwd=tmp_path,
        )
        assert "depth3" in results(run_dir)["model"]


def test_a_val_class_that_train_lacks_is_refused_before_training(tmp_path, folder):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    shutil.copytree(data / "val" / "class_1", data / "val" / "zebra")
    result = run_main(
        "task=train", *IMAGES, f"dataset.root={data}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False
    )
    line = one_line_error(result)
    assert "holds classes the model was not trained on (zebra)" in line and "epoch 1" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_val_folder_missing_a_class_keeps_the_train_labels(tmp_path, folder):
    """val/ without class_0: ImageFolder alone would relabel class_1 as 0; the labels follow train/."""
    import shutil

    from data import build_datasets

    data = tmp_path / "data"
    shutil.copytree(folder, data)
    shutil.rmtree(data / "val" / "class_0")
    splits = build_datasets(
        {"name": "imagefolder", "root": str(data), "native_size": 32},
        {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3},
        augment=False,
    )
    assert splits["val"].classes == splits["train"].classes
    assert sorted(set(splits["val"].targets)) == [1, 2, 3]


@pytest.mark.slow
def test_eval_of_a_checkpoint_against_other_classes_is_refused(tmp_path, folder):
    import shutil

    run_dir = tmp_path / "run"
    run_main(
        "task=train", *IMAGES, f"dataset.root={folder}", "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert results(run_dir)["classes"] == ["class_0", "class_1", "class_2", "class_3"]
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "val" / "class_3").rename(other / "val" / "lynx")
    line = one_line_error(
        run_main(
            "task=eval",
            f"ckpt={run_dir / 'checkpoints' / 'best.pt'}",
            f"dataset.root={other}",
            "runtime.device=cpu",
            cwd=tmp_path,
            check=False,
        )
    )
    assert "holds classes the model was not trained on (lynx)" in line


def test_resume_in_a_folder_without_a_checkpoint_leaves_it_as_it_was(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    for folder in (mine, tmp_path / "empty"):
        if folder.name == "empty":
            folder.mkdir()
        before = folder_bytes(folder)
        line = one_line_error(
            run_main("task=train", *SMOKE, "trainer.resume=true", f"hydra.run.dir={folder}", cwd=tmp_path, check=False)
        )
        assert "does not exist" in line and "left as it is" in line
        assert folder.is_dir() and folder_bytes(folder) == before


def test_warmup_covering_the_run_is_said(tmp_path):
    result = run_main(
        "task=train",
        *[o for o in SMOKE if "warmup" not in o],
        "trainer.epochs=1",
        "trainer.warmup_epochs=3",
        "trainer.max_steps_per_epoch=1",
        f"hydra.run.dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    assert "trainer.warmup_epochs=3 covers the whole run" in result.stdout + result.stderr


@pytest.mark.slow
def test_defaults_fit_the_cores_this_process_may_use(tmp_path):
    """Pinned to one core (as under taskset, SLURM or a container quota): one torch thread, one loader
    worker, no DataLoader warning about too many workers, and no CUDA warning for runtime.device=cpu."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs Linux CPU affinity")
    args = [a for a in SMOKE if "num_workers" not in a] + ["trainer.epochs=1", "trainer.max_steps_per_epoch=2"]
    command = [
        "taskset",
        "-c",
        "0",
        sys.executable,
        str(ROOT / "main.py"),
        "task=train",
        *args,
        f"hydra.run.dir={tmp_path / 'one'}",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert results(tmp_path / "one")["device"] == "cpu (1 threads)"
    assert "worker processes in total" not in result.stderr and "no CUDA GPU" not in result.stderr


def test_the_cuda_warning_comes_once_for_auto(caplog):
    import torch

    from engine.run import runtime

    if torch.cuda.is_available():
        pytest.skip("machines without CUDA")
    runtime._said.discard("no_cuda")
    for _ in range(3):
        runtime.resolve_device("auto")
    runtime.resolve_device("cpu")
    assert caplog.text.count("no CUDA GPU found") == 1


def test_cores_follow_a_cgroup_quota(tmp_path):
    from engine.run.runtime import available_cores

    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert available_cores(str(tmp_path)) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert available_cores(str(tmp_path)) == len(os.sched_getaffinity(0))


def test_hydras_own_flags_still_work_and_write_nothing(tmp_path):
    out = run_main("--cfg", "job", "tome.r=4", "tome.protect=apart", cwd=tmp_path)
    assert "protect: apart" in out.stdout and "  r: 4" in out.stdout
    out = run_main("--info", "defaults", "model=vit_tiny_test", cwd=tmp_path)
    assert "Defaults List" in out.stdout
    assert list(tmp_path.iterdir()) == []
