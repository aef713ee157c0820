"""The research CLI end to end: train, eval, resume, multirun + report, on synthetic data, CPU."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import ROOT, SMOKE, compose_config, results, run_main
from omegaconf import OmegaConf

CONTRACT_KEYS = [
    "task",
    "seed",
    "ckpt",
    "images",
    "trainer.resume",
    "trainer.overwrite",
    "trainer.init_from",
    "dataset.root",
    "dataset.download",
    "model.source",
    "model.name",
    "model.registers",
    "model.img_size",
    "model.pretrained",
    "model.pretrained_file",
    "model.drop_path",
    "tome.r",
    "tome.flops",
    "tome.prop_attn",
    "tome.protect",
    "tome.class_layer",
    "tome.register_layer",
    "trainer.epochs",
    "trainer.batch_size",
    "trainer.lr",
    "runtime.device",
    "runtime.amp",
    "runtime.num_workers",
    "runtime.threads",
    "runtime.eval_batch_size",
    "export.format",
    "export.batch",
    "export.dtype",
]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["dataset=cifar100"],
        ["dataset=imagenet", "dataset.root=/x"],
        ["dataset=imagefolder", "dataset.root=/x"],
        ["dataset=synthetic"],
        ["experiment=cifar10_vits_reg4"],
        ["experiment=cifar_small"],
        ["experiment=imagenet_eval", "dataset.root=/x"],
        ["model=vit_base_patch16_reg4_gap_256"],
        ["model=vit_small_patch14_reg4_dinov2"],
        ["tome.r=[16,-1.0]"],
    ],
)
def test_configs_compose_with_every_contract_key(overrides):
    cfg = compose_config(*overrides)
    for key in CONTRACT_KEYS:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key
    OmegaConf.to_container(cfg.model, resolve=True)


def test_experiments_hold_the_documented_recipes():
    recipe = compose_config("experiment=cifar10_vits_reg4")
    assert (recipe.model.name, recipe.model.registers, recipe.model.img_size) == ("vit_small_patch16_224", 4, 224)
    assert (recipe.trainer.optimizer, recipe.trainer.lr, recipe.trainer.batch_size) == ("adamw", 5e-4, 64)
    small = compose_config("experiment=cifar_small")
    assert (small.model.img_size, small.model.kwargs.patch_size, small.model.registers) == (32, 4, 4)
    evaluation = compose_config("experiment=imagenet_eval", "dataset.root=/x")
    assert evaluation.task == "eval" and evaluation.model.pretrained and evaluation.tome.r == 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch training run through main.py; later tests evaluate, resume and sweep it."""
    work = tmp_path_factory.mktemp("cli")
    run_dir = work / "train"
    run_main("task=train", *SMOKE, "trainer.epochs=2", f"hydra.run.dir={run_dir}", cwd=work)
    return work, run_dir


@pytest.mark.slow
def test_training_learns_and_writes_everything(trained):
    _, run_dir = trained
    record = results(run_dir)
    first, last = record["history"]
    assert last["train_loss"] < first["train_loss"]
    assert record["top1"] > 100 / 4 + 15  # 4 classes: well above chance
    for key in (
        "dataset",
        "model",
        "registers",
        "r",
        "protect",
        "top1",
        "top5",
        "images_per_s",
        "batch_size",
        "dtype",
        "device",
        "gflops",
        "tokens_per_block",
    ):
        assert key in record, key
    assert record["registers"] == 4 and record["tokens_per_block"] == [19, 17]  # 16 patches + 4 regs + cls, r=2
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "state", "rng", "config"} <= set(checkpoint)
    assert checkpoint["state"]["epoch"] == 2
    assert (run_dir / "checkpoints" / "best.pt").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").exists()  # the composed config is saved with the run


@pytest.mark.slow
def test_eval_rebuilds_the_model_from_the_checkpoint_at_any_r(trained):
    work, run_dir = trained
    ckpt = run_dir / "checkpoints" / "best.pt"
    out = work / "eval_r4"
    # no dataset/model overrides: both come from the checkpoint's saved config
    run_main(
        "task=eval",
        f"ckpt={ckpt}",
        "tome.r=4",
        "runtime.device=cpu",
        "runtime.num_workers=0",
        f"hydra.run.dir={out}",
        cwd=work,
    )
    record = results(out)
    assert record["dataset"] == "synthetic" and record["r"] == 4 and record["tokens_per_block"] == [17, 13]
    assert record["top1"] > 25 and record["images_per_s"] > 0
    same_r = work / "eval_same"
    run_main(
        "task=eval", f"ckpt={ckpt}", "runtime.device=cpu", "runtime.num_workers=0", f"hydra.run.dir={same_r}", cwd=work
    )
    best_val = max(h["val_top1"] for h in results(run_dir)["history"])  # best.pt is the best epoch
    assert results(same_r)["top1"] == pytest.approx(best_val)


def test_resume_continues_the_run(trained, tmp_path):
    work, run_dir = trained
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    run_main("task=train", "trainer.resume=true", "trainer.epochs=3", f"hydra.run.dir={copy}", cwd=work)
    record = results(copy)
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3]  # (exactness: tests/test_fault_tolerance.py)


@pytest.mark.slow
def test_multirun_sweep_and_report(trained):
    work, run_dir = trained
    sweep = work / "sweep"
    run_main(
        "-m",
        "task=eval",
        f"ckpt={run_dir / 'checkpoints' / 'best.pt'}",
        "tome.r=0,4",
        "runtime.device=cpu",
        "runtime.num_workers=0",
        f"hydra.sweep.dir={sweep}",
        cwd=work,
    )
    found = sorted(sweep.rglob("results.json"))
    assert len(found) == 2
    import subprocess
    import sys

    from cli_helpers import ROOT

    report = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sweep_report.py"), str(sweep)],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert sorted(json.loads(row["r"]) for row in rows) == [0, 4]
    assert (sweep / "sweep.png").stat().st_size > 1000
    md = (sweep / "sweep.md").read_text().strip().splitlines()
    assert md[0].startswith("All runs: ") and "dataset synthetic" in md[0]  # shared settings said once
    header = [c.strip() for c in md[2].strip("|").split("|")]
    table = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in md[4:]]
    expected = {json.dumps(results(p.parent)["r"]): results(p.parent) for p in found}
    assert len(table) == 2 and "dataset" not in header
    for row in table:  # every row of the table is one run's results.json
        run = expected[row["r"]]
        assert float(row["top1"]) == pytest.approx(run["top1"], rel=1e-3)  # 4 significant digits
        assert float(row["gflops"]) == pytest.approx(run["gflops"], rel=1e-3)
    assert md[2] in report.stdout


def test_bad_input_is_one_clear_line(tmp_path):
    result = run_main("task=eval", f"ckpt={tmp_path / 'missing.pt'}", "runtime.device=cpu", cwd=tmp_path, check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error: checkpoint") and "does not exist" in lines[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["task=train", "dataset=mnist"],
            "error: unknown dataset 'mnist'; choose one of cifar10, cifar100, imagefolder",
        ),
        (["model=vit_huge"], "error: unknown model 'vit_huge'; choose one of"),
        (["-m", "dataset=synthetic,cifar11"], "error: unknown dataset 'cifar11'"),
    ],
)
def test_unknown_config_choice_is_one_line(tmp_path, args, message):
    result = run_main(*args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_original_table_script_composes_and_runs_end_to_end(tmp_path):
    """On the CPU it runs with a tiny model on synthetic data; on a GPU, as is, the real recipe."""
    import subprocess
    import sys

    from cli_helpers import ROOT

    smoke = [o for o in SMOKE if not o.startswith("tome.r")] + ["trainer.epochs=1"]
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "original_table.sh"), str(tmp_path / "table"), *smoke],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "PYTHON": sys.executable},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + 3
    runs = [json.loads(p.read_text()) for p in (tmp_path / "table" / "eval").rglob("results.json")]
    assert len(runs) == 3 * 3  # three schedules, three protection modes
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[1:]:  # our cells are the evaluations' own numbers
        cells = dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
        for mode in ("prefix", "apart", "class"):
            (run,) = [x for x in runs if json.dumps(x["r"]).replace(" ", "") == cells["r"] and x["protect"] == mode]
            assert float(cells[f"top-1 {mode}"]) == pytest.approx(run["top1"], abs=0.006)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
@pytest.mark.slow
def test_gpu_check_without_cuda_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "gpu_check"
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: no CUDA GPU") and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()
