"""How a run ends is in its folder: main.log's last line says it (done, stopped, refused, crashed, a full
disk); a folder whose run never reached a checkpoint never refuses both ways; an unreadable image found
mid-epoch keeps what was trained, or is skipped when asked; smoke runs are bounded by their keys."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from cli_helpers import SMOKE, error_line, last_line, results, run_main, write_image_folder

from engine.run.checkpoint import _reason

CPU = ["runtime.device=cpu", "runtime.num_workers=0"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    work = tmp_path_factory.mktemp("endings")
    run_main("task=train", *SMOKE, "trainer.epochs=2", f"hydra.run.dir={work / 'run'}", cwd=work)
    return work, work / "run"


@pytest.mark.slow
def test_done_is_the_last_line_and_a_resume_says_where_it_resumed(two_epochs):
    work, run = two_epochs
    assert last_line(run / "main.log").startswith("done: ")
    run_main("task=train", *SMOKE, "trainer.resume=true", "trainer.epochs=3", f"hydra.run.dir={run}", cwd=work)
    log = (run / "main.log").read_text()
    assert f"resumed from epoch 3 step 0 of {run / 'checkpoints' / 'last.pt'}" in log
    assert last_line(run / "main.log").startswith("done: ")


def test_a_refusal_of_a_value_leaves_a_kept_folder_as_it_was(two_epochs):
    """The schema refuses a value before any work: the run's folder, main.log included, is not touched."""
    work, run = two_epochs
    before = (run / "main.log").read_bytes()
    result = run_main(
        "task=train", *SMOKE, "trainer.resume=true", "trainer.lr=-1", f"hydra.run.dir={run}", cwd=work, check=False
    )
    assert result.returncode == 2
    assert error_line(result) == "error: trainer.lr=-1: takes a number > 0"
    assert (run / "main.log").read_bytes() == before


def test_a_crash_leaves_its_traceback_and_a_last_line_in_main_log(tmp_path, monkeypatch):
    from engine.training import loop

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in a loss")

    monkeypatch.setattr(loop, "train_step", broken)
    run = tmp_path / "run"
    result = run_main("task=train", *SMOKE, "trainer.epochs=1", f"hydra.run.dir={run}", cwd=tmp_path, check=False)
    assert result.returncode == 1
    log = (run / "main.log").read_text()
    assert "Traceback (most recent call last)" in log and 'raise RuntimeError("a bug in a loss")' in log
    assert last_line(run / "main.log") == "crashed: RuntimeError: a bug in a loss"


def test_a_folder_without_a_checkpoint_never_refuses_both_ways(tmp_path):
    """What a run that ended before its first checkpoint leaves (.hydra, main.log, tensorboard/): resume names
    the way out, a new training starts there and keeps the old files in previous/."""
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("task: train\n")
    (run / "main.log").write_text("[..][INFO] - training ...\n")
    (run / "tensorboard").mkdir()
    resumed = run_main("task=train", *SMOKE, "trainer.resume=true", f"hydra.run.dir={run}", cwd=tmp_path, check=False)
    assert resumed.returncode == 2
    line = error_line(resumed)
    assert "stopped before its first checkpoint" in line and "without trainer.resume=true" in line
    run_main("task=train", *SMOKE, "trainer.epochs=1", f"hydra.run.dir={run}", cwd=tmp_path)
    (previous,) = (run / "previous").iterdir()
    assert (previous / "main.log").read_text() == "[..][INFO] - training ...\n"
    assert results(run)["epochs"] == 1


def test_resume_without_a_run_folder_says_it_needs_one(tmp_path):
    result = run_main("task=train", *SMOKE, "trainer.resume=true", cwd=tmp_path, check=False)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith("error: trainer.resume=true needs the folder of the run to continue: add hydra.run.dir=")
    assert not (tmp_path / "outputs").exists()


@pytest.fixture
def small_disk(tmp_path, two_epochs):
    """A real tmpfs with room for epoch 1's last.pt and best.pt (and the run's logs), not for epoch 2's last.pt
    beside them: the sizes are those of the module's two-epoch run, which has the same model and config."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    checkpoints = two_epochs[1] / "checkpoints"
    last, best = ((checkpoints / name).stat().st_size for name in ("last.pt", "best.pt"))
    disk = tmp_path / "disk"
    disk.mkdir()
    size_kib = (last + best + last // 2) // 1024  # epoch 2's temporary last.pt needs another `last`
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(disk)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: a file a failed run left open


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_disk):
    """The disk fills up while epoch 2 saves: real torch.save meets ENOSPC and its zip writer then raises a
    RuntimeError of its own. One line, exit 1, main.log's last line the same, epoch 1's last.pt intact."""
    run = small_disk / "run"
    result = run_main("task=train", *SMOKE, "trainer.epochs=3", f"hydra.run.dir={run}", cwd=small_disk, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    line = error_line(result)
    last = run / "checkpoints" / "last.pt"
    assert line == (
        f"error: could not save a checkpoint in {run / 'checkpoints'}: {os.strerror(errno.ENOSPC)} "
        f"([Errno {errno.ENOSPC}]); "
        f"{last} (epoch 2 step 0) is intact; once it can be written again, continue with: "
        f"{sys.executable} main.py task=train hydra.run.dir={run} trainer.resume=true"
    )
    assert last_line(run / "main.log") == line
    assert torch.load(last, weights_only=True)["state"]["epoch"] == 1
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_best_pt_holds_what_a_best_checkpoint_is_for(two_epochs):
    _, run = two_epochs
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "config", "state", "classes"} <= set(best) and "optimizer" in last
    assert not {"optimizer", "scheduler", "scaler", "rng"} & set(best)
    for name, tensor in best["model"].items():
        assert torch.equal(tensor, last["model"][name]) or best["state"]["epoch"] < last["state"]["epoch"]


def _images_in_epoch_order(folder, n: int) -> list:
    """The files of train/ in the order epoch 1 reads them (DistributedSampler, seed 0, one process)."""
    files = sorted((folder / "train").glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
    generator = torch.Generator()
    generator.manual_seed(0)
    return [files[i] for i in torch.randperm(n, generator=generator).tolist()]


def _unreadable_run(tmp_path, *extra):
    folder = write_image_folder(tmp_path / "images", {"train": 4, "val": 2})
    bad = _images_in_epoch_order(folder, 16)[-1]  # the last batch of epoch 1: three batches train first
    bad.write_bytes(b"not a png")
    run = tmp_path / "run"
    args = [
        "task=train",
        *[o for o in SMOKE if not o.startswith("dataset")],
        "dataset=imagefolder",
        f"dataset.root={folder}",
        "dataset.native_size=32",
        "trainer.batch_size=4",
        "trainer.epochs=1",
        f"hydra.run.dir={run}",
        *extra,
    ]
    return run, bad, run_main(*args, cwd=tmp_path, check=False)


def test_an_unreadable_image_mid_epoch_keeps_what_was_trained_and_names_the_file(tmp_path):
    run, bad, result = _unreadable_run(tmp_path)
    assert result.returncode == 2
    line = error_line(result)
    assert line.startswith(f"error: cannot read image {bad}") and "dataset.skip_unreadable=true" in line
    assert f"state saved in {run / 'checkpoints' / 'last.pt'} (epoch 1 step 3)" in line
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state"]["step_in_epoch"] == 3
    assert last_line(run / "main.log") == line
    # the resume command it printed, with dataset.skip_unreadable=true, finishes the epoch past the file
    command = line.split("continue with: ")[1].split(" (add ")[0].split()
    resumed = run_main(*command[2:], "dataset.skip_unreadable=true", cwd=tmp_path)
    log = (run / "main.log").read_text()
    assert resumed.returncode == 0 and "resumed from epoch 1 step 3 of" in log and f"{bad}" in log.split("resumed")[-1]
    assert results(run)["epochs"] == 1 and last_line(run / "main.log").startswith("done: ")


def test_a_folder_with_other_files_than_a_started_run_is_still_refused(tmp_path):
    """Only a folder holding nothing but a started run's config, log and scalars is taken over: a visualize
    folder (its figures) is refused as a folder that holds a run."""
    run = tmp_path / "vis"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("task: visualize\n")
    (run / "sample_0.png").write_bytes(b"a figure")
    result = run_main("task=train", *SMOKE, f"hydra.run.dir={run}", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "already holds a run" in error_line(result)
    assert (run / "sample_0.png").read_bytes() == b"a figure" and not (run / "previous").exists()


def test_skip_unreadable_skips_and_counts_in_the_log(tmp_path):
    run, bad, result = _unreadable_run(tmp_path, "dataset.skip_unreadable=true")
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in (run / "main.log").read_text().splitlines() if "skipped (" in line]
    assert len(skipped) == 1 and "1 so far" in skipped[0] and str(bad) in skipped[0]
    assert results(run)["history"][0]["epoch"] == 1


@pytest.mark.slow
def test_max_val_steps_bounds_validation(tmp_path):
    run = tmp_path / "run"
    run_main(
        "task=train",
        *SMOKE,
        "trainer.epochs=1",
        "dataset.val_size=100",
        "runtime.eval_batch_size=8",
        "trainer.max_val_steps=2",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert results(run)["history"][0]["val_samples"] == 16
    bad = run_main("task=train", *SMOKE, "trainer.max_val_steps=0", cwd=tmp_path, check=False)
    assert error_line(bad) == "error: trainer.max_val_steps=0: takes an int >= 1"


@pytest.mark.slow
def test_visualize_num_samples_bounds_a_folder_and_says_so(two_epochs, tmp_path):
    _, run = two_epochs
    folder = write_image_folder(tmp_path / "images", {"val": 3}, num_classes=1) / "val" / "class_0"
    out = tmp_path / "vis"
    result = run_main(
        "task=visualize",
        f"ckpt={run / 'checkpoints' / 'best.pt'}",
        *CPU,
        f"images={folder}",
        "visualize.num_samples=2",
        "visualize.blocks=[0]",
        "visualize.dense_features=false",
        "visualize.compare_protect=false",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert f"images={folder}: the first 2 of its 3 images (visualize.num_samples=2;" in result.stdout
    assert sorted(p.name for p in out.glob("*.png") if p.stem in ("0", "1", "2")) == ["0.png", "1.png"]
    assert len(json.loads((out / "visualize.json").read_text())["images"]) == 2


def test_a_torch_load_error_is_quoted_by_its_first_sentence_whole():
    long = RuntimeError(
        "Weights only load failed. Check the documentation of torch.load.\n"
        "PytorchStreamReader failed reading zip archive: failed finding central directory. More text that "
        "goes on about what might have happened."
    )
    assert _reason(long) == "PytorchStreamReader failed reading zip archive: failed finding central directory"
    assert _reason(RuntimeError("x" * 500)) == "RuntimeError"  # too long to quote: its type


def test_a_console_that_went_away_is_dropped_and_nothing_else_is():
    """The stream wrapper: a closed pipe makes writes vanish (its descriptor then points at /dev/null); a
    character the console's encoding lacks is still an error, as without the wrapper."""
    import io
    import os

    from engine.run.console import _SurvivingStream

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (tee) is gone
    stream = _SurvivingStream(open(write_end, "w", buffering=1))
    assert stream.write("progress\n") == len("progress\n") and stream.gone
    stream.write("more\n")
    stream.flush()  # nothing raises: the descriptor now writes to /dev/null
    assert os.path.samefile(f"/proc/self/fd/{write_end}", os.devnull) or not os.path.exists("/proc/self/fd")
    ascii_console = _SurvivingStream(io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    with pytest.raises(UnicodeEncodeError):
        ascii_console.write("caf\u00e9")
    assert not ascii_console.gone


def test_a_bounded_validation_draws_across_the_classes_the_same_images_each_time(tmp_path):
    """trainer.max_val_steps on an image folder (listed class by class): the images validated come from across
    the set, not the first class alone, and are the same on every call (every epoch, a resume)."""
    from torchvision.datasets import ImageFolder

    from engine.training.setup import bounded

    val = ImageFolder(str(write_image_folder(tmp_path / "images", {"val": 8}, size=8) / "val"))
    subset = bounded(val, max_steps=1, global_batch=8)
    classes = {val.targets[i] for i in subset.indices}
    assert len(subset) == 8 and len(classes) > 1, classes
    assert bounded(val, max_steps=1, global_batch=8).indices == subset.indices
    assert bounded(val, max_steps=4, global_batch=8) is val  # the whole set fits: no subset
