"""Training that survives faults: signals, kills mid-save, NaN losses, exact resume, unique run dirs."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from cli_helpers import ROOT, SMOKE, compose_config, max_weight_difference, results, run_main, write_image_folder
from engine import train
from engine.checkpoint import atomic_save, load_checkpoint
from engine.errors import UserError

# Long enough to be interrupted mid-epoch: 256 steps per epoch.
LONG = [*SMOKE, "dataset.train_size=2048", "trainer.batch_size=8", "trainer.epochs=2", "model.drop_path=0.1"]


def test_sigterm_mid_epoch_saves_and_resume_matches_uninterrupted(tmp_path):
    """Real images through loader workers with augmentation (crop + flip): resume is still exact."""
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    folder = write_image_folder(tmp_path / "images", {"train": 512, "val": 8})
    run = [*[o for o in SMOKE if not o.startswith("dataset")], "trainer.epochs=2", "model.drop_path=0.1",
           "dataset=imagefolder", f"dataset.root={folder}", "dataset.native_size=32", "runtime.num_workers=2",
           "trainer.augment=true", "trainer.batch_size=32"]  # 4 classes x 512 / 32: 64 steps per epoch
    process = subprocess.Popen([sys.executable, str(ROOT / "main.py"), "task=train", *run,
                                f"hydra.run.dir={interrupted}"], cwd=tmp_path, stderr=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    log = []
    reader = threading.Thread(target=lambda: log.extend(iter(lambda: process.stderr.read(64).decode(errors="replace"), "")))
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:  # wait until epoch 1 has done a few steps
        steps = re.findall(r"epoch 1:\s+\d+%\|[^|]*\|\s*(\d+)/64", "".join(log))
        if steps and int(steps[-1]) >= 10:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    reader.join()
    stderr = "".join(log)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    match = re.search(r"stopped by SIGTERM at epoch 0 step (\d+); state saved in (\S+last\.pt); "
                      r"continue with: python main.py task=train hydra.run.dir=\S+ trainer.resume=true", stderr)
    assert match, stderr[-2000:]
    checkpoint = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    assert checkpoint["state"]["epoch"] == 0 and 0 < checkpoint["state"]["step_in_epoch"] < 64
    assert checkpoint["state"]["step_in_epoch"] == int(match.group(1))

    run_main("task=train", "trainer.resume=true", f"hydra.run.dir={interrupted}", cwd=tmp_path)
    run_main("task=train", *run, f"hydra.run.dir={straight}", cwd=tmp_path)
    a = load_checkpoint(interrupted / "checkpoints" / "last.pt")
    b = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert max_weight_difference(a["model"], b["model"]) <= 1e-6
    history_a, history_b = results(interrupted)["history"], results(straight)["history"]
    for h in history_a + history_b:
        h.pop("train_images_per_s"), h.pop("val_images_per_s"), h.pop("seconds")  # wall-clock, not a result
    assert len(history_a) == len(history_b) == 2
    for epoch_a, epoch_b in zip(history_a, history_b):
        assert epoch_a == pytest.approx(epoch_b, rel=1e-6)


def test_resume_after_k_epochs_is_exact(tmp_path):
    """EMA, mixup/cutmix (numpy RNG), drop path (torch RNG) and the schedule all restored."""
    common = [*SMOKE, "trainer.ema=true", "trainer.ema_decay=0.9", "trainer.mixup=0.8", "trainer.cutmix=1.0",
              "model.drop_path=0.1", "trainer.warmup_epochs=1", "trainer.max_steps_per_epoch=4"]
    straight = train.run(compose_config("task=train", *common, "trainer.epochs=3"), tmp_path / "a", overrides=[])
    stopped = train.run(compose_config("task=train", *common, "trainer.epochs=3", "trainer.stop_after_epochs=1"),
                        tmp_path / "b", overrides=[])
    assert stopped["epochs"] == 1
    resumed = train.run(compose_config("task=train", *common, "trainer.epochs=3", "trainer.resume=true"), tmp_path / "b",
                        overrides=["trainer.resume=true", "trainer.stop_after_epochs=null"])
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
from engine.checkpoint import atomic_save
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


def test_killed_while_saving_leaves_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    result = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(path)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
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
    with pytest.raises(UserError, match="loss is nan at epoch 1 step 2; stopped without saving"):
        train.run(cfg, tmp_path, overrides=["trainer.resume=true", "trainer.epochs=2"])
    after = {name: (tmp_path / "checkpoints" / name).read_bytes() for name in ("last.pt", "best.pt")}
    assert after == before


RUN_ID = "from engine.run_dir import run_id; print(run_id())"
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
    started = [subprocess.Popen([sys.executable, "-c", RUN_ID], stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]  # started in the same second
    ids = [p.communicate()[0].strip() for p in started]
    assert ids[0] != ids[1] and ids[0][:10] == time.strftime("%Y-%m-%d")
    ranks = subprocess.run([sys.executable, "-c", TORCHRUN_LIKE, RUN_ID], capture_output=True, text=True, env=env,
                           check=True).stdout.split()
    assert len(ranks) == 2 and ranks[0] == ranks[1]  # children of one agent share its run directory
