"""Training that survives faults: signals, kills mid-save, NaN losses, exact resume, unique run dirs."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_helpers import ROOT, SMOKE, compose_config, max_weight_difference, write_image_folder

from engine.errors import TrainingInterrupted, UserError
from engine.run.checkpoint import atomic_save, load_checkpoint
from engine.tasks import train
from engine.training import loop


def signal_at_update(monkeypatch, update: int, signum: int = signal.SIGTERM) -> None:
    """Send a real signal to this process right after optimizer update `update`: the stop lands at a
    known step every time, whatever the machine's speed."""
    real_step = loop.optimizer_step

    def step(model, opt, state):
        real_step(model, opt, state)
        if state.num_updates == update:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(loop, "optimizer_step", step)


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resume_matches_uninterrupted(tmp_path, monkeypatch):
    """Real images through 2 loader workers with augmentation (crop + flip): resume is still exact."""
    folder = write_image_folder(tmp_path / "images", {"train": 48, "val": 8})
    run = [
        *[o for o in SMOKE if not o.startswith(("dataset", "runtime.num_workers"))],
        "trainer.epochs=2",
        "model.drop_path=0.1",
        "dataset=imagefolder",
        f"dataset.root={folder}",
        "dataset.native_size=32",
        "runtime.num_workers=2",
        "trainer.augment=true",
        "trainer.batch_size=16",
    ]  # 4 x 48 / 16: 12 steps per epoch
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    with monkeypatch.context() as patch:
        signal_at_update(patch, update=5)
        with pytest.raises(TrainingInterrupted) as stopped:
            train.run(compose_config("task=train", *run), interrupted, overrides=[])
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert str(stopped.value) == (
        f"stopped by SIGTERM at epoch 1 step 5; state saved in {interrupted / 'checkpoints' / 'last.pt'}; "
        f"continue with: {sys.executable} main.py task=train hydra.run.dir={interrupted} trainer.resume=true"
    )
    checkpoint = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    assert (checkpoint["state"]["epoch"], checkpoint["state"]["step_in_epoch"]) == (0, 5)

    resumed = train.run(
        compose_config("task=train", *run, "trainer.resume=true"), interrupted, overrides=["trainer.resume=true"]
    )
    uninterrupted = train.run(compose_config("task=train", *run), straight, overrides=[])
    a = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    b = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert max_weight_difference(a["model"], b["model"]) <= 1e-6
    strip = lambda hs: [{k: v for k, v in h.items() if "per_s" not in k and k != "seconds"} for h in hs]  # noqa: E731
    assert len(resumed["history"]) == len(uninterrupted["history"]) == 2
    for epoch_a, epoch_b in zip(strip(resumed["history"]), strip(uninterrupted["history"])):
        assert epoch_a == pytest.approx(epoch_b, rel=1e-6)


@pytest.mark.slow
def test_resume_after_k_epochs_is_exact(tmp_path):
    """EMA, mixup/cutmix (numpy RNG), drop path (torch RNG) and the schedule all restored."""
    common = [
        *SMOKE,
        "trainer.ema=true",
        "trainer.ema_decay=0.9",
        "trainer.mixup=0.8",
        "trainer.cutmix=1.0",
        "model.drop_path=0.1",
        "trainer.warmup_epochs=1",
        "trainer.max_steps_per_epoch=4",
    ]
    straight = train.run(compose_config("task=train", *common, "trainer.epochs=3"), tmp_path / "a", overrides=[])
    stopped = train.run(
        compose_config("task=train", *common, "trainer.epochs=3", "trainer.stop_after_epochs=1"),
        tmp_path / "b",
        overrides=[],
    )
    assert stopped["epochs"] == 1
    resumed = train.run(
        compose_config("task=train", *common, "trainer.epochs=3", "trainer.resume=true"),
        tmp_path / "b",
        overrides=["trainer.resume=true", "trainer.stop_after_epochs=null"],
    )
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert max_weight_difference(a["model"], b["model"]) <= 1e-6
    assert max_weight_difference(a["ema"], b["ema"]) <= 1e-6
    assert a["optimizer"]["param_groups"][0]["lr"] == pytest.approx(b["optimizer"]["param_groups"][0]["lr"])
    strip = lambda hs: [{k: v for k, v in h.items() if "per_s" not in k and k != "seconds"} for h in hs]  # noqa: E731
    assert len(resumed["history"]) == len(straight["history"]) == 3
    for epoch_a, epoch_b in zip(strip(resumed["history"]), strip(straight["history"])):
        assert epoch_a == pytest.approx(epoch_b, rel=1e-6)
    # best.pt holds the first epoch with the best validation accuracy, never a worse one
    best = load_checkpoint(tmp_path / "a" / "checkpoints" / "best.pt")["state"]
    tops = [h["val_top1"] for h in straight["history"]]
    assert best["epoch"] == tops.index(max(tops)) + 1 and best["best_top1"] == max(tops)


KILL_MID_SAVE = """
import os, sys, torch
from engine.run.checkpoint import atomic_save
path = sys.argv[1]
atomic_save({"version": torch.tensor(1)}, path)
real_save = torch.save
def dying_save(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04 half of a zip file")  # some bytes reach the disk, then the process dies
    f.flush()
    os._exit(9)
torch.save = dying_save
atomic_save({"version": torch.tensor(2)}, path)
"""


@pytest.mark.slow
def test_killed_while_saving_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    result = subprocess.run(
        [sys.executable, "-c", KILL_MID_SAVE, str(path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 9
    assert torch.load(path, weights_only=True)["version"].item() == 1
    atomic_save({"version": torch.tensor(3)}, path)  # the next save still works
    assert torch.load(path, weights_only=True)["version"].item() == 3


def test_nan_loss_stops_and_keeps_good_checkpoints(tmp_path, monkeypatch):
    common = [*SMOKE, "trainer.max_steps_per_epoch=4"]
    train.run(compose_config("task=train", *common, "trainer.epochs=1"), tmp_path, overrides=[])
    before = {name: (tmp_path / "checkpoints" / name).read_bytes() for name in ("last.pt", "best.pt")}

    real_loss = torch.nn.CrossEntropyLoss

    class NaNAfterTwo(real_loss):
        calls = 0

        def forward(self, logits, targets):
            NaNAfterTwo.calls += 1
            loss = super().forward(logits, targets)
            return loss * float("nan") if NaNAfterTwo.calls > 2 else loss

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NaNAfterTwo)
    cfg = compose_config("task=train", *common, "trainer.epochs=2", "trainer.resume=true")
    with pytest.raises(UserError, match="loss is nan at epoch 2 step 3; stopped without saving"):
        train.run(cfg, tmp_path, overrides=["trainer.resume=true", "trainer.epochs=2"])
    after = {name: (tmp_path / "checkpoints" / name).read_bytes() for name in ("last.pt", "best.pt")}
    assert after == before


RUN_ID = "from engine.run.folder_claim import run_id; print(run_id())"
TORCHRUN_LIKE = """
import os, subprocess, sys
env = {**os.environ, "LOCAL_RANK": "0"}
ids = [subprocess.run([sys.executable, "-c", sys.argv[1]], env=dict(env, LOCAL_RANK=str(i)), capture_output=True,
                      text=True, check=True).stdout.strip() for i in range(2)]
print(" ".join(ids))
"""


def test_run_dirs_unique_per_run_and_shared_by_ranks():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("REGTOME_RUN_ID", None)
    env.pop("LOCAL_RANK", None)
    started = [
        subprocess.Popen([sys.executable, "-c", RUN_ID], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]  # started in the same second
    ids = [p.communicate()[0].strip() for p in started]
    assert ids[0] != ids[1] and ids[0][:10] == time.strftime("%Y-%m-%d")
    ranks = subprocess.run(
        [sys.executable, "-c", TORCHRUN_LIKE, RUN_ID], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # children of one agent share its run directory
