"""The GPU path. Marked `cuda`: `python -m pytest -m cuda -q` on a CUDA machine; skipped elsewhere.

Tolerances: CUDA's index_add_ and attention kernels are not bit-deterministic, so a resumed CUDA run
is compared with an uninterrupted one to 1e-4 (fp32), not the CPU's 1e-6.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from cli_helpers import ROOT, SMOKE, compose_config, max_weight_difference
from conftest import make_vit

import regtome
from engine.run.checkpoint import load_checkpoint
from engine.tasks import benchmark, evaluate, train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = [o for o in SMOKE if not o.startswith(("trainer.device", "trainer.amp"))] + ["runtime.device=cuda"]


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_train_a_few_steps_with_amp(tmp_path, amp):
    record = train.run(
        compose_config("task=train", *GPU, f"runtime.amp={amp}", "trainer.epochs=2"), tmp_path, overrides=[]
    )
    assert record["dtype"] == amp
    first, last = record["history"]
    assert torch.isfinite(torch.tensor(last["train_loss"])) and last["train_loss"] < first["train_loss"]
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    if amp == "fp16":
        assert checkpoint["scaler"], "the GradScaler state is saved with fp16"


def test_resume_on_cuda_matches_uninterrupted(tmp_path):
    common = [*GPU, "runtime.amp=off", "trainer.epochs=2", "trainer.max_steps_per_epoch=4"]
    train.run(compose_config("task=train", *common), tmp_path / "a", overrides=[])
    train.run(compose_config("task=train", *common, "trainer.stop_after_epochs=1"), tmp_path / "b", overrides=[])
    train.run(
        compose_config("task=train", *common, "trainer.resume=true"),
        tmp_path / "b",
        overrides=["trainer.resume=true", "trainer.stop_after_epochs=null"],
    )
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert max_weight_difference(a, b) <= 1e-4


def test_eval_on_cuda_matches_the_cpu(tmp_path):
    train.run(compose_config("task=train", *SMOKE, "trainer.epochs=1"), tmp_path / "run", overrides=[])
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    results = {}
    for device in ("cpu", "cuda"):
        cfg = compose_config(
            "task=eval", f"ckpt={ckpt}", f"runtime.device={device}", "runtime.amp=off", "runtime.num_workers=0"
        )
        results[device] = evaluate.run(cfg, tmp_path / device, overrides=[])
    assert results["cuda"]["top1"] == pytest.approx(results["cpu"]["top1"], abs=100 / 64 + 1e-6)  # <= 1 sample


def test_benchmark_times_with_cuda_and_reports_peak_memory(tmp_path):
    cfg = compose_config(
        "task=benchmark",
        *GPU,
        "runtime.amp=fp16",
        "benchmark.r=[0,2]",
        "benchmark.batch_sizes=[4]",
        "benchmark.repeats=2",
        "benchmark.iters=1",
        "benchmark.warmup=1",
    )
    rows = benchmark.run(cfg, tmp_path, overrides=[])
    assert all(row["peak_memory_mb"] > 0 and row["images_per_s"] > 0 for row in rows)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["dtype"] == "fp16" and "loader" in record


def test_compile_matches_eager():
    model = regtome.patch.timm(make_vit("class_reg4").cuda(), r=4)
    images = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(copy.deepcopy(model))(images)
    torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=2e-3)


def test_cuda_graphs_run_the_patched_forward_and_backward_without_recompiling():
    """runtime.compile=reduce-overhead: one graph, replayed as CUDA graphs call after call, forward and backward."""
    model = regtome.patch.timm(make_vit("class_reg4").cuda(), r=4).train()
    compiled = torch.compile(model, mode="reduce-overhead")
    images = torch.randn(4, 3, 32, 32, device="cuda")
    torch._dynamo.utils.counters.clear()
    for _ in range(4):
        compiled(images).sum().backward()
    torch.cuda.synchronize()
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])


def test_compiled_training_and_benchmark_on_cuda(tmp_path):
    record = train.run(
        compose_config("task=train", *GPU, "runtime.compile=true", "trainer.epochs=1"), tmp_path / "t", overrides=[]
    )
    assert record["top1"] is not None
    assert not any(
        k.startswith("_orig_mod.") for k in load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")["model"]
    )
    cfg = compose_config(
        "task=benchmark",
        *GPU,
        "runtime.compile=true",
        "benchmark.r=[2]",
        "benchmark.batch_sizes=[1]",
        "benchmark.repeats=2",
        "benchmark.iters=2",
        "benchmark.train_step=false",
        "benchmark.loader=false",
    )
    rows = benchmark.run(cfg, tmp_path / "b", overrides=[])
    assert {row["execution"] for row in rows} == {"eager", "compiled", "cuda graphs"}


def test_device_resize_on_cuda_matches_the_cpu():
    from data.transforms import ResizeNormalize

    prepare = ResizeNormalize(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(prepare.cuda()(images.cuda()).cpu(), prepare.cpu()(images), atol=1e-4, rtol=1e-4)


def test_ddp_with_nccl_at_world_size_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "REGTOME_RUN_ID": "nccl"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=1",
            str(ROOT / "main.py"),
            "task=train",
            *GPU,
            "trainer.epochs=1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("protect", ["prefix", "apart"])
def test_patched_forward_never_waits_for_the_gpu(protect):
    model = regtome.patch.timm(make_vit("gap_reg4").cuda(), r=(8, -1.0), trace_source=True, protect=protect)
    images = torch.randn(4, 3, 32, 32, device="cuda")
    model(images)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            model(images)
        model.train()
        model(images).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert regtome.last_forward(model).size.dtype == torch.float32  # sizes stay fp32 under AMP


def test_transformers_forward_never_waits_for_the_gpu():
    from test_transformers import build

    model = regtome.patch.transformers(build("dinov3").cuda(), r=(8, -1.0), protect="apart")
    images = torch.randn(4, 3, 32, 32, device="cuda")
    model(images)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
