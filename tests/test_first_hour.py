"""A newcomer's first hour (issue #28): one way in per situation, named where it fails; image folders that
know their images; data mistakes refused before training; small things that mislead."""

import csv
import os
import urllib.error

import pytest
import torch
from cli_helpers import SMOKE, results, run_main, write_image_folder

CPU = ["runtime.device=cpu", "runtime.num_workers=0"]
TINY = ["model=vit_tiny_test", "trainer.epochs=1", "trainer.batch_size=16", "trainer.warmup_epochs=0", *CPU]


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def test_the_main_job_offline_names_both_ways_in_and_leaves_nothing(tmp_path, monkeypatch):
    """No network: the archive to copy and the class-folder alternative, and no datasets/ or run folder left."""
    import torchvision.datasets.cifar as cifar

    def no_network(url, download_root, *args, **kwargs):
        os.makedirs(download_root, exist_ok=True)
        (open(os.path.join(download_root, "cifar-10-python.tar.gz.part"), "w")).close()  # a partial download
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    line = one_line_error(run_main("task=train", "dataset=cifar10", *TINY, cwd=tmp_path, check=False))
    assert "could not download cifar10 into datasets/CIFAR10" in line
    assert "copy cifar-10-python.tar.gz" in line and "dataset=imagefolder dataset.root=DIR" in line
    assert sorted(os.listdir(tmp_path)) == []  # no datasets/ (not even the partial file), no outputs/
    assert not (tmp_path.parent / "data" / "CIFAR10").exists()


def test_a_32px_folder_trains_with_the_size_read_from_its_images(tmp_path):
    """The README's own-images line on 32 px images: augmentation on, loader workers on, no native_size given."""
    folder = write_image_folder(tmp_path / "pets", {"train": 12, "val": 4}, size=32)
    run = tmp_path / "run"
    result = run_main(
        "task=train",
        "dataset=imagefolder",
        f"dataset.root={folder}",
        *TINY[:-1],
        "trainer.augment=true",
        "runtime.num_workers=2",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert "dataset.native_size=32, read from the images of" in result.stdout and "all 32x32" in result.stdout
    record = results(run)
    assert record["epochs"] == 1 and record["top1"] == record["history"][-1]["val_top1"]
    assert "native_size: null" in (run / ".hydra" / "config.yaml").read_text()  # the config as given
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert saved["dataset"]["native_size"] == 32  # what ran


def test_a_size_the_augmentation_cannot_take_is_refused_before_the_first_step(tmp_path):
    folder = write_image_folder(tmp_path / "small", {"train": 4, "val": 2}, size=32)
    result = run_main(
        "task=train",
        "dataset=imagefolder",
        f"dataset.root={folder}",
        "dataset.native_size=224",
        *TINY,
        cwd=tmp_path,
        check=False,
    )
    line = one_line_error(result)
    assert "dataset.native_size=224 but the images of" in line and "dataset.native_size=32" in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("case", ["one class", "empty class folders"])
def test_data_that_cannot_train_a_classifier_is_refused_without_a_run_folder(tmp_path, case):
    root = tmp_path / "data"
    if case == "one class":
        write_image_folder(root, {"train": 6, "val": 2}, num_classes=1)
        expected = "holds 1 class folder (class_0): a classifier needs at least two classes"
    else:
        for split in ("train", "val"):
            for name in ("cat", "dog"):
                (root / split / name).mkdir(parents=True)
        expected = "class folders without images in"
    line = one_line_error(
        run_main("task=train", "dataset=imagefolder", f"dataset.root={root}", *TINY, cwd=tmp_path, check=False)
    )
    assert expected in line
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("first_hour")
    run_main("task=train", *SMOKE, "trainer.epochs=1", f"hydra.run.dir={work / 'run'}", cwd=work)
    return work, work / "run" / "checkpoints" / "best.pt"


@pytest.mark.slow
def test_a_checkpoint_against_a_data_set_of_another_class_count_names_both(checkpoint, tmp_path):
    work, ckpt = checkpoint
    line = one_line_error(run_main("task=eval", f"ckpt={ckpt}", "dataset=cifar100", *CPU, cwd=tmp_path, check=False))
    assert f"checkpoint {ckpt} has 4 classes, the data set (cifar100) 100" in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_more_loader_workers_than_cores_is_said_naming_the_cores(checkpoint, tmp_path):
    from engine.run.runtime import available_cores

    work, ckpt = checkpoint
    result = run_main(
        "task=eval",
        f"ckpt={ckpt}",
        "runtime.device=cpu",
        "runtime.num_workers=64",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    said = [line for line in result.stdout.splitlines() if "runtime.num_workers=64" in line]
    assert len(said) == 1 and f"may use {available_cores()} core" in said[0]


def test_every_task_summary_names_the_protection_mode(checkpoint, tmp_path):
    work, ckpt = checkpoint
    evaluated = run_main(
        "task=eval", f"ckpt={ckpt}", "tome.protect=prefix", *CPU, f"hydra.run.dir={tmp_path / 'e'}", cwd=tmp_path
    )
    assert any("top-1" in line and "protect=prefix" in line for line in evaluated.stdout.splitlines())
    trained = run_main(
        "task=train",
        *SMOKE,
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=1",
        f"hydra.run.dir={tmp_path / 't'}",
        cwd=tmp_path,
    )
    assert any("training " in line and "protect=apart" in line for line in trained.stdout.splitlines())


def test_a_flop_budget_warns_about_no_r_nobody_set(tmp_path):
    """The budget's r counts the cap already (there: r=11 merges 10 and 5 in the last blocks)."""
    smoke = [o for o in SMOKE if not o.startswith("tome.r")]
    result = run_main(
        "task=train",
        *smoke,
        "model.kwargs.patch_size=4",
        "model.kwargs.depth=6",
        "tome.flops=0.5",
        "tome.protect=prefix",
        "trainer.epochs=1",
        "trainer.max_steps_per_epoch=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert "tome.flops=0.5: r=" in result.stdout and "beyond the cap" not in result.stdout
    record = results(tmp_path / "run")
    assert record["r_per_block"] != record["r_requested_per_block"]  # the cap did bind: nothing to warn about


def test_a_timm_name_under_transformers_and_a_hub_id_under_timm_name_the_right_source(tmp_path):
    line = one_line_error(
        run_main("task=train", *TINY, "model.source=transformers", "dataset=synthetic", cwd=tmp_path, check=False)
    )
    assert "is a timm model: set model.source=timm" in line
    line = one_line_error(
        run_main(
            "task=train", *TINY, "model.name=facebook/dinov2-small", "dataset=synthetic", cwd=tmp_path, check=False
        )
    )
    assert "looks like a Hugging Face hub id: set model.source=transformers" in line


@pytest.mark.parametrize(
    "preset", ["hf_vit_base", "hf_deit_small", "hf_dinov2_reg4_small", "hf_dinov3_small", "hf_siglip_base"]
)
@pytest.mark.slow
def test_every_transformers_preset_builds_offline_from_its_own_architecture(preset):
    """model.pretrained=false: the preset's config values, random weights, no hub; the hub's shapes."""
    from cli_helpers import compose_config
    from omegaconf import OmegaConf

    import regtome
    from engine.models.build import build_model

    cfg = compose_config(f"model={preset}", "dataset=synthetic", "tome.r=4")
    assert cfg.model.pretrained is False and cfg.model.architecture is not None
    model = build_model(cfg.model, cfg.tome, 4)
    vision = OmegaConf.to_container(cfg.model.architecture)
    vision = vision.get("vision_config", vision)
    inner = model.regtome_inner_models()[0] if hasattr(model, "regtome_inner_models") else model
    assert regtome.is_patched(model) and inner.config.hidden_size == vision["hidden_size"]
    assert model.regtome_num_blocks == vision["num_hidden_layers"]


@pytest.mark.slow
def test_a_transformers_folder_is_weights_for_eval_without_further_keys(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification

    config = Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        num_register_tokens=4,
        num_labels=4,
    )
    Dinov2WithRegistersForImageClassification(config).save_pretrained(tmp_path / "weights")
    run_main(
        "task=eval",
        "model=hf_dinov2_reg4_small",
        f"model.pretrained_dir={tmp_path / 'weights'}",
        "model.img_size=32",
        "dataset=synthetic",
        *CPU,
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    evaluated = results(tmp_path / "eval")
    with open(tmp_path / "eval" / "predictions.csv") as f:  # top-1 is what the per-sample predictions say
        correct = [int(row["correct"]) for row in csv.DictReader(f)]
    assert correct and evaluated["top1"] == pytest.approx(100 * sum(correct) / len(correct))


@pytest.mark.parametrize("setting", ["model.registers=8", "model.drop_path=0.1"])
def test_timm_settings_a_transformers_model_would_ignore_are_refused(tmp_path, setting):
    """model.registers and model.drop_path are timm's: given to a transformers model they would change nothing."""
    run = tmp_path / "run"
    tiny_hf = ["model.img_size=32", "model.architecture.hidden_size=32", "model.architecture.num_hidden_layers=1"]
    tiny_hf += ["model.architecture.num_attention_heads=2", "model.architecture.patch_size=8"]
    result = run_main(
        "task=train",
        "model=hf_dinov2_reg4_small",
        *tiny_hf,
        setting,
        "dataset=synthetic",
        *TINY[1:],  # not its model
        "trainer.max_steps_per_epoch=1",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        check=False,
    )
    line = one_line_error(result)
    assert line.startswith(f"error: {setting}: a transformers model does not read them") and "model.kwargs" in line
    assert not run.exists()
