"""Data loaders offline (CIFAR on-disk format, ImageFolder, local weights) and every bad input."""

import os
import random
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from cli_helpers import ROOT, SMOKE, compose_config, write_cifar
from PIL import Image

from data import DatasetError, build_datasets, input_transform
from engine.errors import CheckpointHoldsCode, CorruptCheckpoint, UserError
from engine.models.build import build_model
from engine.run.checkpoint import load_checkpoint
from engine.tasks import evaluate, train

DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "interpolation": "bicubic",
    "crop_pct": 0.9,
}


@pytest.fixture
def skip_md5(monkeypatch):
    """Our files cannot match the real CIFAR md5 sums: check presence instead (download stays untouched)."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loader_reads_torchvision_format(tmp_path, skip_md5, name):
    written = write_cifar(tmp_path, name)
    cfg = compose_config(f"dataset={name}", f"dataset.root={tmp_path}", "dataset.download=false").dataset
    splits = build_datasets(cfg, DATA_CONFIG, augment=False)
    assert len(splits["train"]) == (6 if name == "cifar100" else 30) and len(splits["val"]) == 6
    image, label = splits["val"][2]
    data, labels = written["test" if name == "cifar100" else "test_batch"]
    assert image.shape == (3, 32, 32) and label == labels[2]
    expected = torch.tensor(data[2].reshape(3, 32, 32), dtype=torch.float32) / 255
    torch.testing.assert_close(image, (expected - 0.5) / 0.25, atol=1e-5, rtol=0)  # the pixels, normalised


def test_cifar_without_network_says_how_to_fix(tmp_path, monkeypatch):
    import torchvision.datasets.utils as utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(utils, "_urlretrieve", offline)
    monkeypatch.setattr(utils, "_get_redirect_url", lambda url, max_hops=3: url)
    cfg = compose_config("dataset=cifar10", f"dataset.root={tmp_path / 'CIFAR10'}").dataset
    with pytest.raises(
        DatasetError, match="could not download cifar10 .* without network, copy cifar-10-python.tar.gz"
    ):
        build_datasets(cfg, DATA_CONFIG)


def test_cifar_missing_without_download(tmp_path):
    cfg = compose_config("dataset=cifar10", f"dataset.root={tmp_path}", "dataset.download=false").dataset
    with pytest.raises(DatasetError, match="not found in .*dataset.download=true"):
        build_datasets(cfg, DATA_CONFIG)


def make_image_tree(root: Path, classes=("cat", "dog"), per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png"
                )


@pytest.mark.parametrize("dataset", ["imagenet", "imagefolder"])
def test_image_folders(tmp_path, dataset):
    make_image_tree(tmp_path)
    cfg = compose_config(f"dataset={dataset}", f"dataset.root={tmp_path}").dataset
    data_config = dict(DATA_CONFIG, input_size=(3, 224, 224))
    splits = build_datasets(cfg, data_config)
    assert len(splits["train"]) == 6 and splits["val"].classes == ["cat", "dog"]
    image, label = splits["val"][4]
    # 40 px images (their size read from the folder): shipped as they are, resized to 224 on the device
    assert image.shape == (3, 40, 40) and image.dtype == torch.uint8 and label == 1
    assert input_transform(cfg, data_config)(image[None]).shape == (1, 3, 224, 224)


def test_imagefolder_uses_test_split_when_no_val(tmp_path):
    make_image_tree(tmp_path)
    (tmp_path / "val").rename(tmp_path / "test")
    cfg = compose_config("dataset=imagefolder", f"dataset.root={tmp_path}").dataset
    assert len(build_datasets(cfg, DATA_CONFIG, splits=("val",))["val"]) == 6


def test_missing_dataset_folder(tmp_path):
    cfg = compose_config("dataset=imagenet", f"dataset.root={tmp_path / 'nowhere'}").dataset
    with pytest.raises(DatasetError, match="does not exist; set dataset.root"):
        build_datasets(cfg, DATA_CONFIG)


def test_corrupt_image_names_the_file(tmp_path):
    make_image_tree(tmp_path)
    bad = tmp_path / "val" / "dog" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = compose_config("dataset=imagefolder", f"dataset.root={tmp_path}").dataset
    dataset = build_datasets(cfg, DATA_CONFIG, splits=("val",))["val"]
    with pytest.raises(DatasetError, match=f"cannot read image {bad}"):
        dataset[4]


def test_unknown_dataset_and_model():
    dataset = compose_config("dataset=synthetic").dataset  # the words the tasks read, as a checkpoint holds them
    dataset.name = "mnist"  # the schema refuses it on the command line; a config handed to data/ is checked there
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        build_datasets(dataset, DATA_CONFIG)
    cfg = compose_config("model.name=vit_does_not_exist")
    with pytest.raises(UserError, match="unknown model 'vit_does_not_exist'"):
        build_model(cfg.model, cfg.tome, 10)
    cfg = compose_config("model.name=resnet18")
    with pytest.raises(UserError, match="cannot apply RegToMe to resnet18.*VisionTransformer"):
        build_model(cfg.model, cfg.tome, 10)


@pytest.mark.parametrize(
    "r,match",
    [("abc", "r must be an int"), (-1, "r must be >= 0"), ("[16,2.0]", "inflection"), ("[1,-2]", "ints >= 0")],
)
def test_bad_r(r, match):
    cfg = compose_config("model=vit_tiny_test", f"tome.r={r}")
    with pytest.raises(UserError, match=match):
        build_model(cfg.model, cfg.tome, 10)


def test_pretrained_file_loads_local_weights(tmp_path):
    cfg = compose_config("model=vit_tiny_test", "model.registers=0", "tome.r=0")
    reference = timm.create_model("vit_small_patch16_224", img_size=32, **cfg.model.kwargs).eval()  # 1000 classes
    path = tmp_path / "weights.pth"
    torch.save(reference.state_dict(), path)
    cfg.model.pretrained_file = str(path)
    images = torch.randn(2, 3, 32, 32)
    model = build_model(cfg.model, cfg.tome, 1000).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images))
    # fine-tuning on 10 classes: timm keeps the backbone and starts a new head
    finetune = build_model(cfg.model, cfg.tome, 10).eval()
    with torch.no_grad():
        torch.testing.assert_close(finetune.forward_features(images), reference.forward_features(images))
    assert finetune.head.out_features == 10
    cfg.model.pretrained_file = str(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="pretrained_file .* does not exist"):
        build_model(cfg.model, cfg.tome, 10)


def test_weights_in_neither_cache_nor_hub_say_where_they_were_looked_for(monkeypatch):
    """The wording follows huggingface_hub's own offline flag (the real offline load: tests/test_offline.py)."""
    from huggingface_hub import constants

    from engine.models.build import not_found

    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/cache/hub")
    err = OSError("We couldn't connect to 'https://huggingface.co'")
    for flag, looked in ((True, "HF_HUB_OFFLINE is set"), (False, "nor fetched from the hub (We couldn't connect")):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", flag)
        line = not_found("weights of m (timm/m)", err, "set model.pretrained_file=PATH")
        assert line.startswith("weights of m (timm/m): ") and "the Hugging Face cache (/cache/hub)" in line
        assert looked in line and "set model.pretrained_file=PATH, or run once where the hub is reachable" in line


# checkpoints ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ckpt")
    cfg = compose_config("task=train", *SMOKE, "trainer.epochs=1", "trainer.max_steps_per_epoch=2")
    train.run(cfg, run_dir, overrides=[])
    return run_dir / "checkpoints" / "last.pt"


def _eval(ckpt, *overrides, tmp_path):
    cfg = compose_config("task=eval", f"ckpt={ckpt}", "runtime.device=cpu", "runtime.num_workers=0", *overrides)
    return evaluate.run(cfg, tmp_path, overrides=list(overrides))


def test_truncated_and_corrupt_checkpoints(checkpoint, tmp_path):
    data = checkpoint.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(random.Random(0).randbytes(2048))
    global_opcode = tmp_path / "starts_like_a_global.pt"  # b"c" is pickle's GLOBAL opcode: still just corrupt
    global_opcode.write_bytes(b"c" + random.Random(1).randbytes(2047))
    with pytest.raises(CorruptCheckpoint, match="truncated or corrupt"):
        load_checkpoint(truncated)
    for path in (garbage, global_opcode):  # no zip archive as torch.save writes: never a checkpoint
        with pytest.raises(CorruptCheckpoint, match=f"^{path} is not a checkpoint"):
            load_checkpoint(path)
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    assert checkpoint.read_bytes() == data  # nothing already written is touched


def test_checkpoint_of_another_architecture_names_the_mismatch(checkpoint, tmp_path):
    with pytest.raises(UserError, match="model.registers: checkpoint 4, config 0"):
        _eval(checkpoint, "model.registers=0", tmp_path=tmp_path)
    with pytest.raises(
        UserError, match="model.name: checkpoint 'vit_small_patch16_224', config 'vit_tiny_patch16_224'"
    ):
        _eval(checkpoint, "model.name=vit_tiny_patch16_224", tmp_path=tmp_path)


def test_raw_weights_passed_as_checkpoint(tmp_path):
    path = tmp_path / "raw.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="not a RegToMe checkpoint .*model.pretrained_file"):
        load_checkpoint(path)


class Payload:
    """Unpickling this would run a command: weights_only loading must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/regtome_pwned",))


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointHoldsCode, match="weights_only loading refuses"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/regtome_pwned")


def test_resume_without_checkpoint(tmp_path):
    cfg = compose_config("task=train", *SMOKE, "trainer.resume=true")
    with pytest.raises(UserError, match="resume=true but .*last.pt does not exist"):
        train.run(cfg, tmp_path, overrides=[])
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("split", ["val", "test"])
def test_an_image_folder_with_only_a_val_or_test_split_is_enough_to_evaluate(tmp_path, split):
    """Weights trained elsewhere (model.pretrained_file) evaluated on DIR/val/ or DIR/test/ alone: the classes
    are read from the split there is; no train/ is needed."""
    from cli_helpers import results, run_main, write_image_folder

    cfg = compose_config("model=vit_tiny_test")
    weights = tmp_path / "weights.pth"
    torch.save(build_model(cfg.model, cfg.tome, 4).state_dict(), weights)
    folder = write_image_folder(tmp_path / "images", {split: 2}, num_classes=4, size=32)
    run = tmp_path / "eval"
    run_main(
        "task=eval",
        "model=vit_tiny_test",
        f"model.pretrained_file={weights}",
        "dataset=imagefolder",
        f"dataset.root={folder}",
        "runtime.device=cpu",
        "runtime.num_workers=0",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert results(run)["metrics"]["samples"] == 8


def test_images_and_image_folders_take_the_same_suffixes(tmp_path):
    """One list of image suffixes (torchvision's, what ImageFolder reads) for images=DIR, image folders and
    scripts/split_image_folder.py: a .tif or .ppm image counts everywhere or nowhere."""
    import importlib.util

    from torchvision.datasets.folder import IMG_EXTENSIONS

    from data.images import load_images

    source = tmp_path / "source"
    for name in ("cat", "dog"):
        (source / name).mkdir(parents=True)
        for i, suffix in enumerate((".png", ".tif", ".ppm", ".jpeg")):
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(source / name / f"{i}{suffix}")
        (source / name / "notes.txt").write_text("not an image")
    cfg = compose_config("dataset=imagefolder", f"dataset.root={tmp_path / 'split'}", f"images={source / 'cat'}")
    spec = importlib.util.spec_from_file_location("split_image_folder", ROOT / "scripts" / "split_image_folder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.split(source, tmp_path / "split", val_per_class=1) == (6, 2)
    assert len(build_datasets(cfg.dataset, DATA_CONFIG, splits=("train",))["train"]) == 6
    drawn = load_images(cfg, DATA_CONFIG, None, count=10)
    assert [name for name, _, _ in drawn] == ["0", "1", "2", "3"]
    assert {".tif", ".ppm"} <= set(IMG_EXTENSIONS)
