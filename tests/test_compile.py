"""runtime.compile: train, eval and benchmark with torch.compile, checked before any work; checkpoints that
move between compiled and eager runs. Compiled with the aot_eager backend (tests/aot_eager.py): the
same tracing and autograd as inductor without generating kernels, which takes minutes on a CPU; inductor
itself is run by tests/test_patch.py (the patched forward) and on CUDA by tests/test_cuda.py."""

import pytest
import torch
from aot_eager import use_aot_eager
from cli_helpers import SMOKE, compose_config, max_weight_difference, results, run_main
from conftest import make_vit

import regtome
from engine.run.checkpoint import load_checkpoint


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    use_aot_eager(monkeypatch)


def one_line_error(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def test_a_bad_value_or_a_machine_that_cannot_compile_is_one_line_before_any_work(tmp_path, monkeypatch):
    line = one_line_error(run_main("task=train", *SMOKE, "runtime.compile=fast", cwd=tmp_path, check=False))
    assert "runtime.compile=fast: takes false, true or a torch.compile mode" in line
    import engine.run.session as session_module

    monkeypatch.setattr(session_module.shutil, "which", lambda name: None)  # no C++ compiler on PATH
    line = one_line_error(run_main("task=train", *SMOKE, "runtime.compile=true", cwd=tmp_path, check=False))
    assert "needs a C++ compiler" in line and "set runtime.compile=false" in line
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_compiled_training_matches_eager_and_its_checkpoints_resume_either_way(tmp_path):
    common = [*SMOKE, "trainer.epochs=2", "trainer.max_steps_per_epoch=3"]
    run_main("task=train", *common, f"hydra.run.dir={tmp_path / 'eager'}", cwd=tmp_path)
    run_main(
        "task=train",
        *common,
        "runtime.compile=true",
        "trainer.stop_after_epochs=1",
        f"hydra.run.dir={tmp_path / 'mixed'}",
        cwd=tmp_path,
    )
    saved = load_checkpoint(tmp_path / "mixed" / "checkpoints" / "last.pt")
    assert not any(key.startswith("_orig_mod.") for key in saved["model"])  # the plain module's weights
    assert saved["config"]["runtime"]["compile"] is True
    run_main(
        "task=train",
        *common,
        "trainer.resume=true",
        "runtime.compile=false",  # compiled -> eager
        f"hydra.run.dir={tmp_path / 'mixed'}",
        cwd=tmp_path,
    )
    a = load_checkpoint(tmp_path / "eager" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "mixed" / "checkpoints" / "last.pt")["model"]
    assert max_weight_difference(a, b) <= 1e-5  # compiled steps change nothing but the speed
    run_main(
        "task=eval",
        f"ckpt={tmp_path / 'eager' / 'checkpoints' / 'last.pt'}",
        "runtime.compile=true",
        "runtime.device=cpu",
        "runtime.num_workers=0",
        f"hydra.run.dir={tmp_path / 'eval'}",
        cwd=tmp_path,
    )
    assert results(tmp_path / "eval")["compile"] == "default"  # eager -> compiled


@pytest.mark.slow
def test_a_new_schedule_compiles_once(images):
    from engine.run.session import compile_model

    model = regtome.patch.timm(make_vit("class_reg4"), r=2)
    compiled = compile_model(model, "default")
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        for r in (2, 4, 2, 4, 2):
            with regtome.options(model, r=r):
                torch.testing.assert_close(compiled(images), model(images), atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.slow
def test_the_benchmark_times_eager_and_compiled_side_by_side_with_latency():
    from engine.measure.speed import Timing, benchmark_rows

    merged = regtome.patch.timm(make_vit("class_reg4"), r=2)
    baseline = regtome.remove_patch(make_vit("class_reg4"))
    timing = Timing(warmup=1, repeats=2, iters=2, train_step=True, compile="default", device=torch.device("cpu"))
    rows = benchmark_rows(baseline, merged, [4], [2], timing)
    keys = {(row["mode"], row["execution"], row["r"], row["batch_size"]) for row in rows}
    assert keys == {
        (mode, run, r, batch)
        for mode in ("inference", "train")
        for run in ("eager", "compiled")
        for r in ("unpatched", "4")
        for batch in (2,)
    }
    latency = {(row["mode"], row["execution"], row["r"]): row["latency_ms"] for row in rows}
    for row in rows:
        assert row["latency_p90_ms"] >= row["latency_ms"] > 0 and row["warmup_s"] > 0
        # each speedup pairs the row with the unpatched model run the same way, and with the eager one
        mode, execution = row["mode"], row["execution"]
        same_way = latency[(mode, execution, "unpatched")] / row["latency_ms"]
        eagerly = latency[(mode, "eager", "unpatched")] / row["latency_ms"]
        assert row["speedup"] == pytest.approx(same_way, rel=1e-3)
        assert row["speedup_vs_eager"] == pytest.approx(eagerly, rel=1e-3)


def test_the_cpu_benchmark_is_sized_for_minutes_unless_told_otherwise():
    from engine.tasks.benchmark import settings

    cfg = compose_config("task=benchmark")
    quick = settings(cfg, [], torch.device("cpu"))
    assert list(quick.r) == [0, 16] and list(quick.batch_sizes) == [1, 8] and quick.dense is False
    told = settings(compose_config("task=benchmark", "benchmark.r=[0,8]"), ["benchmark.r=[0,8]"], torch.device("cpu"))
    assert list(told.r) == [0, 8] and list(told.batch_sizes) == [1, 8]  # the command line wins, key by key
    assert list(settings(cfg, [], torch.device("cuda")).batch_sizes) == [1, 8, 64]  # CUDA: the config as it is


@pytest.mark.slow
def test_compiled_training_under_amp_matches_eager_amp(tmp_path):
    """runtime.compile with runtime.amp=bf16 (the CPU's autocast): the compiled steps run the same bf16 ops."""
    common = [*SMOKE, "runtime.amp=bf16", "trainer.epochs=1", "trainer.max_steps_per_epoch=3"]
    for name, compile_as in (("eager", "false"), ("compiled", "true")):
        torch._dynamo.utils.counters.clear()
        run_main(
            "task=train", *common, f"runtime.compile={compile_as}", f"hydra.run.dir={tmp_path / name}", cwd=tmp_path
        )
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == (name == "compiled")
    a = load_checkpoint(tmp_path / "eager" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.pt")
    assert a["config"]["runtime"]["amp"] == b["config"]["runtime"]["amp"] == "bf16"
    assert max_weight_difference(a["model"], b["model"]) <= 1e-5
