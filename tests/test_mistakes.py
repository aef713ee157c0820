"""Everyday mistakes (issue #10): nothing lost, nothing mislabelled, every bad input one line."""

import csv
import json
import subprocess
import sys

import pytest
import torch
from cli_helpers import ROOT, SMOKE, error_line, results, run_main, write_image_folder

CPU = ["runtime.device=cpu", "runtime.num_workers=0"]


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    return error_line(result)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("mistakes")
    run_dir = work / "run"
    result = run_main("task=train", *SMOKE, "trainer.epochs=2", f"hydra.run.dir={run_dir}", cwd=work)
    return work, run_dir, result


def folder_bytes(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_training_into_a_used_folder_is_refused_and_overwrite_keeps_the_old_run(trained):
    work, run_dir, _ = trained
    before = folder_bytes(run_dir)
    result = run_main(
        "task=train", *SMOKE, "trainer.epochs=1", "trainer.lr=0.5", f"hydra.run.dir={run_dir}", cwd=work, check=False
    )
    line = one_line_error(result)
    assert "already holds a run" in line and "trainer.resume=true" in line and "another folder" in line
    assert folder_bytes(run_dir) == before  # not one byte written: config, checkpoints, log, results

    # overwrite=true trains a new run there; the old one is moved to previous/<time>/, byte for byte
    import shutil

    copy = work / "overwritten"
    shutil.copytree(run_dir, copy)
    run_main(
        "task=train",
        *SMOKE,
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=1",
        "trainer.overwrite=true",
        f"hydra.run.dir={copy}",
        cwd=work,
    )
    (previous,) = (copy / "previous").iterdir()
    assert folder_bytes(previous) == before
    assert results(copy)["epochs"] == 1 and results(copy)["history"][0]["epoch"] == 1
    assert "epochs: 1" in (copy / ".hydra" / "config.yaml").read_text()  # the new run's own record


def test_training_reports_each_epoch_on_stdout_and_in_main_log(trained):
    _, run_dir, result = trained
    epochs = [line for line in result.stdout.splitlines() if "epoch " in line and "train loss" in line]
    assert len(epochs) == 2 and "epoch 2/2" in epochs[1]
    for field in ("train loss", "val top-1", "img/s", " s"):
        assert field in epochs[1]
    assert any("best val top-1" in line and str(run_dir) in line for line in result.stdout.splitlines())
    log = (run_dir / "main.log").read_text()
    assert "epoch 1/2" in log and "best val top-1" in log


@pytest.mark.parametrize("amp,dtype", [("auto", "fp32"), ("bf16", "bf16")])
def test_cpu_trains_in_fp32_unless_asked(tmp_path, amp, dtype):
    from cli_helpers import compose_config

    from engine.tasks import train

    overrides = [o for o in SMOKE if not o.startswith("runtime.amp")] + [
        f"runtime.amp={amp}",
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=1",
    ]
    record = train.run(compose_config("task=train", *overrides), tmp_path, overrides=[])
    assert record["dtype"] == dtype


def test_labels_say_what_ran(trained):
    work, run_dir, _ = trained
    record = results(run_dir)
    assert record["model"] == "vit_small_patch16_224-patch8-dim32-depth2-heads2-reg4-32px"
    assert record["model_name"] == "vit_small_patch16_224" and record["model_kwargs"]["depth"] == 2
    assert record["data_root"] is None and record["img_size"] == 32
    # eval of a checkpoint is filed under the checkpoint's data set and model, not the composed defaults
    run_main("task=eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", *CPU, cwd=work)
    (folder,) = (work / "outputs" / "eval").iterdir()
    assert folder.name == "synthetic_vit_small_patch16_224-patch8-dim32-depth2-heads2-reg4-32px"
    (run,) = folder.iterdir()
    assert results(run)["model"] == record["model"]
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    assert [int(r["index"]) for r in rows] == list(range(64)) and set(rows[0]) >= {"target", "pred", "correct"}


@pytest.mark.parametrize(
    "protect,applied",
    [
        ("prefix", [8, 4]),  # 16 patches + 5 prefix tokens: at most half of the 16 mergeable tokens, then of 8
        ("apart", [6, 3]),  # 16 patches + 4 registers mergeable (m=20, R=4): min(10, 10 - 4); then m=14: min(7, 7 - 4)
    ],
)
def test_r_beyond_the_cap_is_said_once_and_recorded_as_applied(trained, tmp_path, protect, applied):
    work, run_dir, _ = trained
    result = run_main(
        "task=eval",
        f"ckpt={run_dir / 'checkpoints' / 'best.pt'}",
        "tome.r=40",
        f"tome.protect={protect}",
        *CPU,
        f"hydra.run.dir={tmp_path / 'capped'}",
        cwd=work,
    )
    warnings = [line for line in result.stdout.splitlines() if "beyond the cap" in line]
    assert len(warnings) == 1 and "tome.r=40" in warnings[0]
    others = [mode for mode in ("prefix", "class", "apart") if mode != protect]
    assert f"beyond the cap under protect={protect} (" in warnings[0]  # the mode in force, and only it
    assert not any(f"protect={mode}" in warnings[0] for mode in others)
    record = results(tmp_path / "capped")
    assert record["r_per_block"] == applied and record["r_requested_per_block"] == [40, 40]
    assert record["tokens_per_block"] == [21 - applied[0], 21 - sum(applied)]


@pytest.mark.parametrize(
    "args,message",
    [
        (["task=train", "dataset=imagefolder"], "dataset=imagefolder needs a folder: add dataset.root=DIR"),
        (["task=train", "trainer.batch_size=0"], "trainer.batch_size=0: takes an int >= 1"),
        (["task=train", "trainer.lr=-1"], "trainer.lr=-1: takes a number > 0"),
        (["task=train", "trainer.epochs=0"], "trainer.epochs=0: takes an int >= 1"),
        (["task=benchmark", "benchmark.r=[-1]"], "benchmark.r=[-1]: takes an r as regtome reads it (r must be >= 0"),
        (["task=benchmark", "benchmark.protect=[apart,bogus]"], "benchmark.protect=[apart,bogus]: takes a protection"),
        (["task=benchmark", "benchmark.protect=bogus"], "benchmark.protect=bogus: takes a protection mode or a list"),
        (
            ["task=train", "tome.r=[16,-1]"],
            "tome.r=[16,-1]: takes an r as regtome reads it ([16,-1] is not a schedule: a per-block list holds "
            "ints >= 0; for ToMe's (r, inflection) schedule write [16,-1.0])",
        ),
        (["task=foo"], "task=foo: takes one of train, eval, benchmark, visualize, export"),
        (["task=train", "trainer.lr=abc"], "trainer.lr=abc: takes a number"),
        (["task=train", "dataset=synthetic", "dataset.val_size=2.0"], "dataset.val_size=2.0: takes an int or null"),
        (["task=train", "tome.prop_attn=maybe"], "tome.prop_attn=maybe: takes true or false"),
        (["task=train", "model.img_size=abc"], "model.img_size=abc: takes an int"),
        (["task=train", "trainer.batch_size=-3"], "trainer.batch_size=-3: takes an int >= 1"),
        (["task=train", "runtime.amp=fp8"], "runtime.amp=fp8: takes one of auto, bf16, fp16, off"),
        (["-m", "task=train", "trainer.lr=0.1,abc"], "trainer.lr=abc: takes a number"),
        (["-m", "task=eval", "tome.r=4,-1,8"], "tome.r=-1: takes an r as regtome reads it (r must be >= 0"),
        (["task=train", "tome.r=4,8"], "tome.r=4,8 is a sweep: add -m (--multirun)"),
        (["--cfg", "job", "-m", "task=train", "tome.r=4,8"], "only one of --run, --multirun, --cfg"),
        (["task=train", "hydra/launcher=nope"], "unknown hydra/launcher 'nope'; choose one of basic, slurm,"),
        (["task=train", "model.attn_implementation=flash"], "model.attn_implementation=flash: takes one of eager"),
        (["task=train", "model.architecture.hidden_size=3"], "model.architecture.hidden_size is not a key: model."),
        (
            ["task=train", "model=hf_vit_base", "model.architecture.bogus=3"],
            "model.architecture.bogus is not a key; did you mean model.architecture.",
        ),
        (["task=train", "trainer.eval_every=${trainer.bogus}"], "cannot resolve the config: Interpolation key"),
        (["-m", "task=train", "trainer.lr=glob(*)"], "trainer.lr=glob(*) sweeps no value"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_folder(tmp_path, args, message):
    keys = {a.split("=", 1)[0] for a in args}
    base = [o for o in SMOKE if o.split("=", 1)[0] not in keys]
    line = one_line_error(run_main(*base, *args, cwd=tmp_path, check=False))
    assert line.startswith(f"error: {message}"), line
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def _train_on_images_with_workers(tmp_path, python: list[str]) -> subprocess.CompletedProcess:
    """A real `main.py task=train` process (after `python`'s arguments) reading an image folder with one
    unreadable file, through two loader workers."""
    folder = write_image_folder(tmp_path / "images", {"train": 4, "val": 2})
    (folder / "train" / "class_1" / "2.png").write_bytes(b"not a png")
    overrides = [o for o in SMOKE[1:] if "num_workers" not in o] + ["runtime.num_workers=2", "dataset=imagefolder"]
    overrides += [f"dataset.root={folder}", "dataset.native_size=32", "trainer.batch_size=4"]
    return subprocess.run(  # the timeout only ends a hang: the run itself takes seconds
        [sys.executable, *python, "task=train", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.slow
def test_corrupt_image_in_a_loader_worker_is_one_line_and_the_process_ends(tmp_path):
    """A worker's error, held by its traceback, kept the workers (which ignore SIGTERM) alive, and the
    interpreter's exit waited on them forever."""
    line = one_line_error(_train_on_images_with_workers(tmp_path, [str(ROOT / "main.py")]))
    bad = tmp_path / "images" / "train" / "class_1" / "2.png"
    assert line.startswith(f"error: cannot read image {bad}") and "delete or replace the file" in line


@pytest.mark.slow
def test_a_bug_in_a_loader_worker_shows_its_traceback_and_the_process_ends(tmp_path):
    bug = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import data.datasets as d\n"
        "def load_image(path): raise TypeError('a bug in the loader')\n"
        "d.load_image = load_image; import main; main.run_cli(sys.argv[1:])"
    )
    result = _train_on_images_with_workers(tmp_path, ["-c", bug])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "TypeError: a bug in the loader" in result.stderr


@pytest.mark.slow
def test_visualize_without_weights_says_it_shows_random_weights(tmp_path):
    image = write_image_folder(tmp_path / "images", {"val": 1}, num_classes=1) / "val" / "class_0" / "0.png"
    result = run_main(
        "task=visualize",
        *SMOKE,
        f"images={image}",
        "visualize.blocks=[0,1]",
        "visualize.compare_protect=false",  # one mode and no feature panels: the label is what is checked
        "visualize.dense_features=false",
        f"hydra.run.dir={tmp_path / 'vis'}",
        cwd=tmp_path,
    )
    assert "random weights" in result.stdout
    assert json.loads((tmp_path / "vis" / "visualize.json").read_text())["random_weights"] is True


def test_fp16_on_the_cpu_warns_that_it_is_slow():
    from engine.run.runtime import amp_dtype

    with pytest.warns(UserWarning, match="much slower than fp32"):
        assert amp_dtype("fp16", torch.device("cpu")) == torch.float16
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.slow
def test_a_checkpoint_without_a_recorded_protect_keeps_prefix_and_says_so(trained, tmp_path):
    """Releases before the protect option trained with prefix: such a checkpoint keeps it (the new default
    is apart), and one log line says so; a recorded mode is kept as it is, without a word."""
    work, run_dir, _ = trained
    checkpoint = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert checkpoint["config"]["tome"]["protect"] == "apart"  # trained under today's default
    del checkpoint["config"]["tome"]["protect"]
    old = tmp_path / "old.pt"
    torch.save(checkpoint, old)
    result = run_main("task=eval", f"ckpt={old}", *CPU, f"hydra.run.dir={tmp_path / 'old'}", cwd=work)
    assert results(tmp_path / "old")["protect"] == "prefix"
    said = [line for line in result.stdout.splitlines() if "records no tome.protect" in line]
    assert len(said) == 1 and "protect=prefix" in said[0]
    result = run_main(
        "task=eval", f"ckpt={run_dir / 'checkpoints' / 'best.pt'}", *CPU, f"hydra.run.dir={tmp_path / 'new'}", cwd=work
    )
    assert results(tmp_path / "new")["protect"] == "apart" and "records no tome.protect" not in result.stdout
