"""Offline compute nodes: a Hugging Face cache on disk (a temporary HF_HOME laid out by hand as huggingface_hub
lays it out: refs/main names a snapshot folder), HF_HUB_OFFLINE=1, and a child process in which any network
attempt fails and is counted (tests/offline_child.py). Weights and image processors come from the cache, for timm
and transformers models alike; what is in neither the cache nor the hub is one line naming what was looked for."""

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import ROOT, compose_config, error_line, run_main

CPU = ["runtime.device=cpu", "runtime.num_workers=0", "dataset=synthetic", "dataset.val_size=8"]
TIMM_ID = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"  # timm fetches it from the hub repo timm/<name>
TIMM = ["model=vit_tiny_test", f"model.name={TIMM_ID}", "model.pretrained=true", "tome.r=2"]
SIGLIP = ["model=hf_siglip_base", "model.pretrained=true", "model.img_size=32", "tome.r=2"]


def cached_snapshot(hf_home, repo_id: str):
    """The snapshot folder of `repo_id` in HF_HOME's hub cache, where a download would have put its files."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "1" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def offline_run(tmp_path, hf_home, *overrides: str) -> dict:
    """main.py OVERRIDES in a child process with HF_HOME=hf_home and HF_HUB_OFFLINE=1; its report."""
    out = tmp_path / "report" / "report.json"
    out.parent.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    env.pop("HF_HUB_CACHE", None)
    command = [sys.executable, str(ROOT / "tests" / "offline_child.py"), str(out), str(tmp_path), *overrides]
    subprocess.run(command, env=env, cwd=tmp_path, check=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["network_attempts"] == [], report["network_attempts"]  # the flag: nothing asks the network
    return report


@pytest.mark.slow
def test_timm_weights_come_from_the_cache_offline(tmp_path):
    """The weights a login node cached are loaded (not random ones), and eval runs; without them, one line."""
    import timm
    from safetensors.torch import load_file, save_file

    cfg = compose_config(*TIMM, *CPU)
    kwargs = dict(cfg.model.kwargs, img_size=32, reg_tokens=4, num_classes=1000)
    saved = {k: v.contiguous() for k, v in timm.create_model(TIMM_ID, **kwargs).state_dict().items()}
    save_file(saved, str(cached_snapshot(tmp_path / "hf", f"timm/{TIMM_ID}") / "model.safetensors"))

    report = offline_run(tmp_path, tmp_path / "hf", "task=eval", *TIMM, *CPU, f"hydra.run.dir={tmp_path / 'eval'}")
    assert report["returncode"] == 0, report["stderr"][-3000:]
    loaded = load_file(str(tmp_path / "report" / "weights.safetensors"))
    body = [k for k in saved if not k.startswith("head.")]  # a 4-class head replaces the 1000-class one
    assert body and all(torch.equal(loaded[k], saved[k]) for k in body)


@pytest.mark.slow
def test_transformers_weights_and_image_processor_come_from_the_cache_offline(tmp_path):
    """SigLIP's processor says mean/std 0.5 and bilinear: evaluation uses them, read from the cache with the weights."""
    from transformers import SiglipConfig, SiglipForImageClassification, SiglipImageProcessor

    snapshot = cached_snapshot(tmp_path / "hf", "google/siglip-base-patch16-224")
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = SiglipConfig(vision_config=dict(vision, image_size=32, patch_size=8), num_labels=4)
    SiglipForImageClassification(config).save_pretrained(snapshot)
    processor = SiglipImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2)  # PIL's bilinear
    processor.save_pretrained(snapshot)

    report = offline_run(tmp_path, tmp_path / "hf", "task=eval", *SIGLIP, *CPU, f"hydra.run.dir={tmp_path / 'eval'}")
    assert report["returncode"] == 0, report["stderr"][-3000:]
    assert report["mean"] == report["std"] == [0.5, 0.5, 0.5] and report["interpolation"] == "bilinear"

    (snapshot / "preprocessor_config.json").unlink()  # a repo without a processor: the hub's 404, as cached
    absent = snapshot.parents[1] / ".no_exist" / snapshot.name / "preprocessor_config.json"
    absent.parent.mkdir(parents=True)
    absent.touch()
    report = offline_run(tmp_path, tmp_path / "hf", "task=eval", *SIGLIP, *CPU, f"hydra.run.dir={tmp_path / 'eval2'}")
    assert report["returncode"] == 0, report["stderr"][-3000:]
    assert report["mean"] == [0.485, 0.456, 0.406]
    said = report["stdout"] + report["stderr"]
    assert "google/siglip-base-patch16-224 has no image processor" in said and "using ImageNet's mean/std" in said
    absent.unlink()  # the weights cached, the processor not: one line, not ImageNet's statistics in silence
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        line = error_line(run_main("task=eval", *SIGLIP, *CPU, cwd=tmp_path / "report", check=False))
    assert "google/siglip-base-patch16-224's image processor (preprocessor_config.json" in line
    assert "HF_HUB_OFFLINE is set" in line and "model.pretrained_dir=DIR" in line


@pytest.fixture
def offline_with_an_empty_cache(monkeypatch, tmp_path):
    """huggingface_hub's offline flag and an empty cache, in this process (what the child processes above read
    from HF_HUB_OFFLINE and HF_HOME at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize(
    "model, looked_for, way_out",
    [
        (TIMM, f"timm/{TIMM_ID}", "model.pretrained_file=PATH"),
        (SIGLIP, "google/siglip-base-patch16-224", "model.pretrained_dir=DIR"),
    ],
)
def test_weights_in_neither_cache_nor_hub_are_one_line_naming_what_was_looked_for(
    offline_with_an_empty_cache, tmp_path, model, looked_for, way_out
):
    line = error_line(run_main("task=eval", *model, *CPU, cwd=tmp_path, check=False))
    assert looked_for in line and f"not in the Hugging Face cache ({offline_with_an_empty_cache})" in line
    assert "HF_HUB_OFFLINE is set" in line and way_out in line and "run once where the hub is reachable" in line
    assert not (tmp_path / "outputs").exists()


def test_a_checkpoints_weights_need_no_pretrained_weights_from_the_hub(offline_with_an_empty_cache):
    """eval, visualize or export of a checkpoint trained from pretrained weights: the checkpoint's weights replace
    them, so an offline node without them in its cache still runs (huggingface_hub's flag and cache, in-process)."""
    from engine.errors import UserError
    from engine.models.build import build_model
    from engine.run.session import open_session

    cfg = compose_config(*TIMM, *CPU)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        build_model(cfg.model, cfg.tome, 4)
    trained = build_model(compose_config(*TIMM, *CPU, "model.pretrained=false").model, cfg.tome, 4).state_dict()
    session = open_session(cfg, 4, weights=trained, weights_path="best.pt", distributed=False)
    assert all(torch.equal(value, trained[key]) for key, value in session.model.state_dict().items())


def test_a_resume_needs_no_pretrained_weights_from_the_hub(offline_with_an_empty_cache, tmp_path):
    """A run trained from pretrained weights resumes on a node whose cache lacks them: last.pt replaces them."""
    from cli_helpers import SMOKE

    from engine.tasks import train

    run = tmp_path / "run"
    smoke = [o for o in SMOKE if not o.startswith("model=")]
    train.run(compose_config("task=train", *TIMM, *smoke, "model.pretrained=false", "trainer.epochs=1"), run, [])
    last = run / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["config"]["model"]["pretrained"] = True  # as if it had started from the hub's weights
    torch.save(checkpoint, last)
    resume = ["trainer.resume=true", "trainer.epochs=2"]
    record = train.run(compose_config("task=train", *TIMM, *smoke, *resume), run, resume)
    assert [epoch["epoch"] for epoch in record["history"]] == [1, 2]
