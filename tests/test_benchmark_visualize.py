"""task=benchmark and task=visualize on a tiny random model, plus the colouring function itself."""

import csv
import json

import numpy as np
import pytest
import torch
from cli_helpers import ROOT, compose_config, error_line, run_main
from PIL import Image

from engine.tasks import visualize
from engine.tasks.visualize import CELL_PX, grid_shape, merge_map, patch_groups


@pytest.mark.slow
def test_benchmark_task_writes_csv_md_png(tmp_path):
    run_main(
        "task=benchmark",
        "model=vit_tiny_test",
        "dataset=synthetic",
        "runtime.device=cpu",
        "runtime.amp=off",
        "benchmark.r=[0,2,[2,-1.0]]",
        "benchmark.batch_sizes=[1,4]",
        "benchmark.repeats=2",
        "benchmark.iters=1",
        "benchmark.target_speedup=1.01",
        "benchmark.quick=false",  # every row of the config, not the CPU-sized defaults
        "runtime.num_workers=2",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    rows = list(csv.DictReader(open(tmp_path / "benchmark.csv")))
    # (unpatched + 3 schedules) x 2 batch sizes x (inference, train, dense features)
    assert len(rows) == 4 * 2 * 3
    assert {(r["mode"], r["r"], r["batch_size"]) for r in rows} == {
        (m, r, b)
        for m in ("inference", "train", "dense")
        for r in ("unpatched", "0", "2", "(2,-1.0)")
        for b in ("1", "4")
    }
    record = json.loads((tmp_path / "results.json").read_text())
    loader = record["loader"]
    assert loader["images_per_s_per_worker"] > 0 and loader["num_workers"] == 2 and not loader["resized_on_device"]
    supply = loader["images_per_s_per_worker"] * loader["num_workers"]
    for row in (r for r in record["rows"] if r["mode"] == "train"):  # data-bound: the loader is the slower
        assert row["data_bound"] == (supply < row["images_per_s"])
    target = record["target_speedup"]
    assert target["target_speedup"] == 1.01 and target["tried"]
    reached = [t for t in target["tried"] if t["speedup"] >= 1.01]
    assert reached[:1] == target["tried"][-1:] if target["r"] is not None else not reached  # stops at the first
    if target["r"] is not None:
        assert (target["r"], target["speedup"]) == (reached[0]["r"], reached[0]["speedup"])
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "| data-bound |" in markdown and "images/s per worker" in markdown and "target speedup 1.01x" in markdown
    unpatched = {(r["mode"], r["batch_size"]): r for r in rows if r["r"] == "unpatched"}
    for row in rows:
        assert float(row["images_per_s"]) > 0 and float(row["peak_memory_mb"]) > 0
        base = unpatched[(row["mode"], row["batch_size"])]  # FLOP-ideal: the unpatched GFLOPs over the row's
        assert float(row["flop_speedup"]) == pytest.approx(float(base["gflops"]) / float(row["gflops"]), rel=1e-2)
        assert row["device"].startswith("cpu") and row["dtype"] == "fp32" and row["torch"] and row["timm"]
    gflops = {r["r"]: float(r["gflops"]) for r in rows}
    assert gflops["unpatched"] == gflops["0"] > gflops["2"] > gflops["(2,-1.0)"]
    assert Image.open(tmp_path / "benchmark.png").size == (1650, 440)  # three panels of 5.5 x 4.4 inches at 100 dpi
    assert "FLOP-ideal" in (tmp_path / "benchmark.md").read_text()


def _benchmark_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_patch", ROOT / "scripts" / "benchmark_patch.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_benchmark_patch_script_is_task_benchmark_with_each_protection_mode(tmp_path):
    """scripts/benchmark_patch.py only spells a task=benchmark command; --protect times each r under each mode."""
    script = _benchmark_script()
    flags = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--registers", "2", "--batch", "1"]
    flags += ["--r", "[2, (2, -1)]", "--protect", "apart,prefix", "--repeats", "1", "--iters", "1"]
    args = script.overrides(script.parse_args([*flags, f"hydra.run.dir={tmp_path}"]))
    assert "benchmark.r=[2,[2,-1.0]]" in args and "benchmark.protect=[apart,prefix]" in args
    run_main(*args, cwd=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "benchmark.csv")))
    assert [row["r"] for row in rows] == ["unpatched", "2 apart", "2 prefix", "(2,-1.0) apart", "(2,-1.0) prefix"]
    assert [row["protect"] for row in rows] == ["", "apart", "prefix", "apart", "prefix"]  # unpatched: none
    assert {row["mode"] for row in rows} == {"inference"} and {row["registers"] for row in rows} == {"2"}
    gflops = {row["r"]: float(row["gflops"]) for row in rows}
    assert gflops["2 prefix"] < gflops["2 apart"] < gflops["unpatched"]  # apart keeps registers out of patches' merges
    assert json.loads((tmp_path / "results.json").read_text())["protect"] == "apart,prefix"


def test_benchmark_schedules_take_one_entry_or_a_list():
    import timm
    from omegaconf import OmegaConf

    import regtome
    from engine.tasks.benchmark import benchmark_schedules

    model = regtome.patch.timm(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, reg_tokens=2))
    one = OmegaConf.create({"r": 2, "protect": "prefix"})  # a scalar r and a single mode, as a user may write them
    assert benchmark_schedules(one, model) == [{"r": 2, "protect": "prefix"}]
    assert benchmark_schedules(OmegaConf.create({"r": [2, [2, -1.0]], "protect": None}), model) == [2, (2, -1.0)]
    both = OmegaConf.create({"r": [2], "protect": ["apart", "class"]})
    assert benchmark_schedules(both, model) == [{"r": 2, "protect": "apart"}, {"r": 2, "protect": "class"}]


def test_benchmark_rows_time_and_count_at_the_size_asked():
    """task=benchmark times at model.img_size even where the model was built for another (a hub config's)."""
    import timm

    import regtome
    from engine.measure.speed import Timing, benchmark_rows

    baseline = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, reg_tokens=2, dynamic_img_size=True)
    merged = regtome.patch.timm(
        timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, reg_tokens=2, dynamic_img_size=True)
    )
    timing = Timing(warmup=0, repeats=1, iters=1, train_step=False, device=torch.device("cpu"), size=(3, 64, 64))
    rows = benchmark_rows(baseline, merged, [2], [1], timing)
    gflops = {row["r"]: row["gflops"] for row in rows}
    with regtome.options(merged, r=2):
        assert gflops["2"] == pytest.approx(regtome.vit_flops(merged, (3, 64, 64)))
    assert gflops["unpatched"] == pytest.approx(regtome.schedule_gflops(merged, 0, (3, 64, 64)))
    assert gflops["unpatched"] > regtome.schedule_gflops(merged, 0, (3, 32, 32))
    assert regtome.last_forward(merged).tokens[0] == 64 + 3 - 2  # a 64 px pass ran: 8 x 8 patches, 3 prefix, r=2


def test_benchmark_patch_flags_map_onto_the_config():
    script = _benchmark_script()

    def mapped(*flags: str) -> dict[str, str]:
        return dict(arg.split("=", 1) for arg in script.overrides(script.parse_args(list(flags))))

    default = mapped()
    assert default["model.img_size"] == "224" and default["model.pretrained"] == "false"
    assert "benchmark.protect" not in default  # tome.protect's mode, as the task's default
    assert mapped("--model", "vit_small_patch14_dinov2")["model.img_size"] == "518"  # the model's own size
    assert mapped("--model", "hf-hub:someone/model")["model.img_size"] == "224"  # no timm config: 224
    assert mapped("--r", "[[16, 0], (16, -1), 8]")["benchmark.r"] == "[[16,0,0],[16,-1.0],8]"  # never a pair
    hub = mapped("--source", "transformers", "--model", "facebook/dinov2-with-registers-small", "--img-size", "64")
    assert hub["model.pretrained"] == "true" and hub["model.img_size"] == "64" and "model.pretrained_dir" not in hub
    folder = ROOT / "configs"  # any folder stands for a save_pretrained one
    local = mapped("--source", "transformers", "--model", str(folder))
    assert local["model.pretrained_dir"] == script.quoted(str(folder)) and local["model.pretrained"] == "false"
    assert script.quoted("/data/a,b=(c)") == "'/data/a,b=(c)'" and script.quoted("vit_small") == "vit_small"
    assert "model.pretrained_dir" not in mapped("--source", "transformers", "--model", str(folder), "--random")
    assert mapped("tome.protect=prefix")["tome.protect"] == "prefix"  # extra keys pass through


def test_patch_groups_and_merge_map_on_a_hand_made_source():
    # 1 prefix token + a 2x2 grid of patches; output tokens: prefix, {p0, p1}, {p2}, {p3}
    source = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    labels = patch_groups(source, num_prefix=1)
    assert labels.tolist() == [0, 0, 1, 2]
    image = np.zeros((4, 4, 3))
    image[:2, :2] = [1, 0, 0]  # p0 red
    image[:2, 2:] = [0, 0, 1]  # p1 blue
    image[2:, :2] = [0, 1, 0]  # p2 green
    image[2:, 2:] = [1, 1, 1]  # p3 white
    out = merge_map(image, labels, (2, 2))
    np.testing.assert_allclose(out[0, 0], [0.5, 0, 0.5])  # p0 and p1 share their mean colour
    np.testing.assert_allclose(out[0, 2], [0.5, 0, 0.5])
    assert (out[1, :] == 0).all()  # the boundary under the top group is outlined
    np.testing.assert_allclose(out[2, 1], [0, 0, 0])  # outline between p2 and p3
    np.testing.assert_allclose(out[3, 0], [0, 1, 0])  # p2 keeps its own colour
    np.testing.assert_allclose(out[3, 3], [1, 1, 1])
    assert not (out[0, :] == 0).all(axis=-1).any()  # no outline inside the merged top group


def _visualize(tmp_path, *overrides):
    cfg = compose_config(
        "task=visualize",
        "model=vit_tiny_test",
        "runtime.device=cpu",
        "dataset=synthetic",
        "tome.r=3",
        "visualize.blocks=[0,1]",
        "visualize.num_samples=2",
        *overrides,
    )
    return visualize.run(cfg, tmp_path, overrides=list(overrides))


@pytest.mark.slow
def test_visualize_dataset_samples(tmp_path):
    summary = _visualize(tmp_path)
    assert sorted(summary["images"]) == ["sample_0", "sample_1"]
    rows, cols = grid_shape(num_blocks=2, num_heads=2, num_prefix=5, num_modes=3)
    for info in summary["images"].values():
        png = Image.open(tmp_path / info["png"])
        assert png.size == (cols * CELL_PX, rows * CELL_PX)
        for block in (0, 1):
            # the map has one group per output token that is not a protected prefix token
            assert info["groups"]["prefix"][block] == info["tokens"]["prefix"][block] - 5
        assert info["tokens"]["prefix"][0] == 21 - 3 and info["tokens"]["prefix"][1] == 21 - 6
    assert summary["prefix_tokens"] == ["class", "register 1", "register 2", "register 3", "register 4"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "visualize.json").read_text())["attn_block"] == 1


@pytest.mark.slow
def test_visualize_image_folder_and_protect_ablation(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(folder / f"{name}.jpg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    summary = _visualize(out, f"images={folder}", "tome.r=8", "visualize.num_samples=3")
    assert sorted(summary["images"]) == ["a", "b", "c"]
    info = summary["images"]["a"]
    # r=8 on 16 patches + 5 prefix tokens: protect=prefix keeps 5 tokens out of the matching (21 -> 13 -> 9),
    # protect=class only the class token, so registers merge and fewer tokens remain (21 -> 13 -> 7)
    assert (info["tokens"]["prefix"][1], info["tokens"]["class"][1]) == (9, 7)
    assert info["groups"]["prefix"][1] == 9 - 5  # every unprotected token holds patches
    assert 6 - 4 <= info["groups"]["class"][1] <= 6  # a token made only of registers holds no patch


def test_visualize_missing_images(tmp_path):
    from data import DatasetError  # images=PATH is read by data/images.py

    with pytest.raises(DatasetError, match="does not exist"):
        _visualize(tmp_path, f"images={tmp_path / 'nope'}")


def test_visualize_titles_true_and_predicted_class_and_draws_colour_bars(tmp_path, monkeypatch):
    import matplotlib.figure

    bars, titles = [], []
    real_colorbar, real_suptitle = matplotlib.figure.Figure.colorbar, matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(
        matplotlib.figure.Figure, "colorbar", lambda self, *a, **k: bars.append(1) or real_colorbar(self, *a, **k)
    )
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "suptitle",
        lambda self, text, **k: titles.append(text) or real_suptitle(self, text, **k),
    )
    summary = _visualize(tmp_path, "visualize.num_samples=1", "visualize.dense_features=false")
    info = summary["images"]["sample_0"]
    assert info["true"].startswith("pattern_") and info["predicted"].startswith("pattern_")
    assert f"true: {info['true']}, predicted: {info['predicted']}" in " ".join(titles[0].split())
    assert len(bars) == len(summary["prefix_tokens"]) == 5  # one colour bar per attention row (colours = numbers)


def test_visualize_names_heads_and_blocks_as_people_count_them_and_no_label_it_lacks(tmp_path, monkeypatch):
    """Panels say 'head 1' .. 'head H' and 'after block 2 of 2'; an images= file has no label, so no 'true:'."""
    import matplotlib.axes
    import matplotlib.figure
    from PIL import Image as PILImage

    titles, suptitles = [], []
    real_title, real_suptitle = matplotlib.axes.Axes.set_title, matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "set_title",
        lambda self, text, *a, **k: titles.append(text) or real_title(self, text, *a, **k),
    )
    monkeypatch.setattr(
        matplotlib.figure.Figure,
        "suptitle",
        lambda self, text, **k: suptitles.append(text) or real_suptitle(self, text, **k),
    )
    photo = tmp_path / "photo.png"
    PILImage.new("RGB", (32, 32), (200, 100, 50)).save(photo)
    summary = _visualize(tmp_path, f"images={photo}", "visualize.dense_features=false")
    assert summary["images"]["photo"]["true"] is None
    assert "true:" not in suptitles[0] and "predicted:" in suptitles[0]
    assert "class, head 1" in titles and "class, head 2" in titles and not any(" h0" in t for t in titles)
    assert any(t.startswith("after block 2 of 2:") for t in titles) and not any(t.startswith("block ") for t in titles)


@pytest.mark.slow
def test_a_busy_machine_is_seen_before_timing(tmp_path):
    import subprocess
    import sys

    from engine.measure.timing import busy_processes, machine_note

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time

        time.sleep(0.3)
        busy = busy_processes()
        note = machine_note()
    finally:
        spinner.kill()
    assert any(f"({spinner.pid})" in entry for entry in busy)
    assert note is not None and "timings may be unreliable" in note and str(spinner.pid) in note


@pytest.mark.slow
def test_figure_titles_fit_their_figure(tmp_path, monkeypatch):
    """A long title is wrapped to the figure's width, never clipped at its edges (drawn and measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure
    import matplotlib.pyplot as plt

    from engine.report import fit_title

    saved = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda self, *a, **k: saved.append(self) or real_savefig(self, *a, **k)
    )
    _visualize(tmp_path, "visualize.num_samples=1", "visualize.dense_features=false", "visualize.blocks=[0]")
    long = "a model name that is rather long-" * 6 + "\nrows 1-3: merged tokens; below: attention over the patches " * 2
    fig = plt.figure(figsize=(3 * CELL_PX / 100, 2))
    fig.suptitle(fit_title(long, 3 * CELL_PX / 100), fontsize=7)
    saved.append(fig)
    for figure in saved:
        figure.canvas.draw()
        box = figure._suptitle.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= figure.bbox.width and box.y1 <= figure.bbox.height, figure._suptitle.get_text()
    assert fit_title(long, 3 * CELL_PX / 100).split() == long.split()  # wrapped, not cut


def test_visualize_blocks_are_python_indices_and_one_out_of_range_is_refused(tmp_path):
    """visualize.blocks=[-1] is the last block, as in Python; a block the model lacks names the valid range."""
    quick = ["visualize.num_samples=1", "visualize.compare_protect=false", "visualize.dense_features=false"]
    cfg = compose_config(
        "task=visualize",
        "model=vit_tiny_test",
        "runtime.device=cpu",
        "dataset=synthetic",
        "visualize.blocks=[-1]",
        *quick,
    )
    assert visualize.run(cfg, tmp_path, overrides=[])["blocks"] == [1]  # vit_tiny_test has 2 blocks
    assert visualize.chosen_blocks(None, 12) == [3, 7, 11] and visualize.chosen_blocks(None, 9) == [2, 5, 8]
    assert visualize.chosen_blocks(None, 2) == [0, 1]  # the default fits any depth
    out = tmp_path / "refused"
    refused = run_main(
        "task=visualize",
        "model=vit_tiny_test",
        "runtime.device=cpu",
        "dataset=synthetic",
        "visualize.blocks=[0,2]",
        *quick,
        f"hydra.run.dir={out}",
        cwd=tmp_path,
        check=False,
    )
    assert refused.returncode == 2 and error_line(refused) == (
        "error: visualize.blocks: block 2 does not exist in a model of 2 blocks; "
        "give indices from -2 to 1 (-1: the last)"
    )
    assert not out.exists()


@pytest.mark.parametrize("target, takes", [("0.5", "a number > 1"), ("fast", "a number or null")])
def test_a_target_speedup_that_cannot_be_reached_is_refused_before_anything_is_timed(tmp_path, target, takes):
    tiny = ["task=benchmark", "model=vit_tiny_test", "dataset=synthetic", "runtime.device=cpu"]
    out = tmp_path / "run"
    refused = run_main(*tiny, f"benchmark.target_speedup={target}", f"hydra.run.dir={out}", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and not out.exists()
    assert error_line(refused) == f"error: benchmark.target_speedup={target}: takes {takes}"


def test_benchmark_png_carries_the_busy_machine_warning_its_md_carries(tmp_path, monkeypatch):
    """A figure is often all that is looked at: a busy machine's warning is in benchmark.png as in benchmark.md."""
    import matplotlib.figure
    from matplotlib.text import Text

    from engine.tasks.benchmark import write_outputs

    def row(r: str, speedup: float) -> dict:
        return {
            "mode": "inference",
            "execution": "eager",
            "r": r,
            "batch_size": 8,
            "images_per_s": 100.0 * speedup,
            "latency_ms": 10.0 / speedup,
            "latency_p90_ms": 11.0 / speedup,
            "speedup": speedup,
            "speedup_vs_eager": speedup,
            "gflops": 4.6 / speedup,
            "flop_speedup": speedup,
            "of_ideal": 1.0,
            "warmup_s": 0.1,
            "peak_memory_mb": 10.0,
            "data_bound": None,
        }

    meta = {"model": "vit_tiny_test", "registers": 4, "protect": "apart", "device": "cpu", "dtype": "fp32"}
    meta["compile"] = "off"
    busy = "timings may be unreliable: load average 7.0 on 2 usable cores (stop other work and run it again)"
    texts, savefig = [], matplotlib.figure.Figure.savefig

    def saving(self, *args, **kwargs):  # the real savefig, the figure's words kept
        texts.extend(" ".join(t.get_text().split()) for t in self.findobj(Text))
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", saving)
    write_outputs([row("unpatched", 1.0), row("16", 1.6)], meta, [busy], tmp_path, warning=busy)
    assert f"- {busy}" in (tmp_path / "benchmark.md").read_text()
    assert any(f"WARNING: {busy}" in text for text in texts), texts
