"""DDP through torchrun (gloo on CPU) and the SLURM launcher preset (rendered, never submitted)."""

import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import ROOT, SMOKE, compose_config, max_weight_difference, results, run_main

from engine.run.checkpoint import load_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*overrides: str, cwd, aot_eager: bool = False) -> subprocess.CompletedProcess:
    """main.py on 2 processes; with `aot_eager`, torch.compile on that backend (tests/aot_eager.py)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("REGTOME_RUN_ID", None)
    script = [str(ROOT / "tests" / "aot_eager.py"), str(ROOT / "main.py")] if aot_eager else [str(ROOT / "main.py")]
    result = subprocess.run(
        [*TORCHRUN, *script, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The same training on 2 processes x batch 8 and on 1 process x batch 16."""
    work = tmp_path_factory.mktemp("ddp")
    common = [*SMOKE, "trainer.epochs=2", "dataset.train_size=64", "dataset.val_size=63"]
    torchrun("task=train", *common, "trainer.batch_size=8", cwd=work)  # run dir chosen by the shared run id
    run_main("task=train", *common, "trainer.batch_size=16", f"hydra.run.dir={work / 'single'}", cwd=work)
    return work


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(ddp_run):
    (ddp_dir,) = list((ddp_run / "outputs").glob("train/*/*"))  # one shared run directory
    ddp = load_checkpoint(ddp_dir / "checkpoints" / "last.pt")
    single = load_checkpoint(ddp_run / "single" / "checkpoints" / "last.pt")
    assert max_weight_difference(ddp["model"], single["model"]) <= 1e-5
    # metrics count both ranks: the same training loss as one process
    a, b = results(ddp_dir)["history"], results(ddp_run / "single")["history"]
    assert [h["train_loss"] for h in a] == pytest.approx([h["train_loss"] for h in b], rel=1e-4)
    assert a[-1]["val_samples"] == 63 and a[-1]["val_top1"] == pytest.approx(b[-1]["val_top1"])


@pytest.mark.slow
def test_only_rank_zero_writes(ddp_run):
    (ddp_dir,) = list((ddp_run / "outputs").glob("train/*/*"))
    files = sorted(str(p.relative_to(ddp_dir)) for p in ddp_dir.rglob("*") if p.is_file())
    assert [f for f in files if f.startswith("tensorboard/")].__len__() == 1
    assert files.count("results.json") == 1 and files.count("main.log") == 1
    assert sorted(f for f in files if f.startswith("checkpoints/")) == ["checkpoints/best.pt", "checkpoints/last.pt"]
    assert sorted(f for f in files if f.startswith(".hydra/")) == [
        ".hydra/config.yaml",
        ".hydra/hydra.yaml",
        ".hydra/overrides.yaml",
    ]


@pytest.mark.slow
def test_ddp_eval_counts_every_sample_once(ddp_run):
    """Compiled on both ranks (runtime.compile under torchrun; aot_eager, see test_compile.py) against one
    eager process: the same samples, the same predictions."""
    ckpt = ddp_run / "single" / "checkpoints" / "last.pt"
    torchrun(
        "task=eval",
        f"ckpt={ckpt}",
        "runtime.device=cpu",
        "runtime.num_workers=0",
        "runtime.compile=true",
        "trainer.batch_size=8",
        f"hydra.run.dir={ddp_run / 'eval_ddp'}",
        cwd=ddp_run,
        aot_eager=True,
    )
    run_main(
        "task=eval",
        f"ckpt={ckpt}",
        "runtime.device=cpu",
        "runtime.num_workers=0",
        "trainer.batch_size=8",
        f"hydra.run.dir={ddp_run / 'eval_single'}",
        cwd=ddp_run,
    )
    ddp, single = results(ddp_run / "eval_ddp"), results(ddp_run / "eval_single")
    assert ddp["metrics"]["samples"] == single["metrics"]["samples"] == 63  # 63 = 32 + 31: uneven shards
    assert ddp["top1"] == single["top1"] and ddp["top5"] == single["top5"]
    assert ddp["metrics"]["loss"] == pytest.approx(single["metrics"]["loss"], rel=1e-6)
    assert ddp["world_size"] == 2 and ddp["compile"] == "default" and single["compile"] is None


@pytest.mark.slow
def test_compiled_ddp_training_matches_eager_ddp(ddp_run):
    """runtime.compile under torchrun: DDP-wrapped, then compiled; the steps change nothing but the speed."""
    (eager_dir,) = list((ddp_run / "outputs").glob("train/*/*"))
    common = [*SMOKE, "trainer.epochs=2", "dataset.train_size=64", "dataset.val_size=63", "trainer.batch_size=8"]
    compiled_dir = ddp_run / "compiled"
    torchrun(
        "task=train",
        *common,
        "runtime.compile=true",
        f"hydra.run.dir={compiled_dir}",
        cwd=ddp_run,
        aot_eager=True,
    )
    compiled = load_checkpoint(compiled_dir / "checkpoints" / "last.pt")
    eager = load_checkpoint(eager_dir / "checkpoints" / "last.pt")
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in compiled["model"])  # the plain module
    assert max_weight_difference(compiled["model"], eager["model"]) <= 1e-5


def test_slurm_launcher_preset_composes():
    from hydra import compose, initialize_config_dir

    compose_config()  # registers the run_id resolver
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node, launcher.partition) == (1, 4, 4, "gpu")
    assert launcher.timeout_min > 0 and launcher.max_num_timeout > 0  # requeued on time-out


@pytest.mark.slow
def test_slurm_dry_run_renders_the_job():
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "slurm_dry_run.py"),
            "hydra.launcher.nodes=2",
            "hydra.launcher.gpus_per_node=4",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=600",
            "task=train",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "REGTOME_RUN_ID": "dry-run"},
    )
    script = result.stdout
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=600",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script, line
    assert "multirun/train/cifar10_vit_small_patch16_224-reg4/dry-run/.submitit" in script
    assert "#SBATCH --job-name=main" in script
    assert not (ROOT / "multirun" / "train" / "cifar10_vit_small_patch16_224-reg4" / "dry-run").exists()


def test_slurm_job_ids_name_the_run_dir():
    code = "from engine.run.folder_claim import run_id; print(run_id())"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "4242", "LOCAL_RANK": "1"}
    env.pop("REGTOME_RUN_ID", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "slurm-4242"  # every task, and the job after a requeue, find the same run


@pytest.mark.slow
def test_requeued_slurm_job_resumes(tmp_path, monkeypatch):
    from engine.tasks import train

    cfg = compose_config("task=train", *SMOKE, "trainer.epochs=2", "trainer.stop_after_epochs=1")
    train.run(cfg, tmp_path, overrides=[])
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    record = train.run(
        compose_config("task=train", *SMOKE, "trainer.epochs=2"), tmp_path, overrides=["trainer.stop_after_epochs=null"]
    )
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["state"]["epoch"] == 2
