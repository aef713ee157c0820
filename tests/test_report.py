"""Sweep reports: paired deltas, bootstrap intervals and McNemar p-values against brute-force references."""

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import ROOT

from engine.report.sweep import (
    ReportError,
    add_paired,
    bootstrap_interval,
    collect,
    group_label,
    mcnemar_exact,
    paired_delta,
    swept_keys,
    write_report,
)


def brute_force_mcnemar(b: int, c: int) -> float:
    """Sum of the Binomial(b + c, 1/2) probabilities of outcomes no more likely than the observed one."""
    n = b + c
    probs = [math.comb(n, k) / 2**n for k in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[b] * (1 + 1e-12)))


@pytest.mark.parametrize("b,c", [(0, 0), (3, 3), (10, 2), (1, 9), (25, 40), (0, 7)])
def test_mcnemar_exact_matches_brute_force(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(brute_force_mcnemar(b, c), rel=1e-9)


def test_bootstrap_interval_is_seeded_and_close_to_the_normal_interval():
    rng = np.random.default_rng(3)
    differences = rng.choice([-1.0, 0.0, 1.0], size=4000, p=[0.1, 0.75, 0.15])
    low, high = bootstrap_interval(differences)
    assert (low, high) == bootstrap_interval(differences)  # fixed seed: the same interval every time
    half = 1.96 * differences.std() / math.sqrt(len(differences))
    assert low == pytest.approx(differences.mean() - half, abs=0.2 * half)
    assert high == pytest.approx(differences.mean() + half, abs=0.2 * half)
    assert bootstrap_interval(np.zeros(100)) == (0.0, 0.0)


def test_paired_delta_counts_discordant_pairs():
    base = np.array([1, 1, 1, 0, 0, 1, 0, 1])
    run = np.array([1, 0, 1, 1, 1, 1, 0, 0])
    result = paired_delta(base, run)
    assert result.delta_top1 == pytest.approx(100 * (run.mean() - base.mean()))
    assert (result.only_baseline, result.only_run, result.samples) == (2, 2, 8)
    assert result.p_value == 1.0 and result.ci_low <= result.delta_top1 <= result.ci_high


def write_run(folder, r, protect, checkpoint, correct, gflops, flops_fraction=None):
    folder.mkdir(parents=True)
    record = {
        "task": "eval",
        "dataset": "cifar10",
        "model": "vit",
        "checkpoint": checkpoint,
        "registers": 4,
        "r": r,
        "flops_fraction": flops_fraction,
        "protect": protect,
        "prop_attn": True,
        "top1": 100 * float(np.mean(correct)),
        "top5": 99.0,
        "images_per_s": 100.0 + 10 * gflops,
        "gflops": gflops,
        "batch_size": 8,
        "dtype": "fp32",
        "device": "cpu",
        "predictions": "predictions.csv",
    }
    (folder / "results.json").write_text(json.dumps(record))
    with open(folder / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "target", "pred", "correct", "prob"])
        for i in reversed(range(len(correct))):  # any row order: rows are matched by index
            writer.writerow([i, 0, 0 if correct[i] else 1, int(correct[i]), 0.5])


@pytest.fixture
def sweep(tmp_path):
    rng = np.random.default_rng(0)
    truth = {}
    job = 0
    for seed in (0, 1):
        ckpt = f"/runs/seed{seed}/checkpoints/best.pt"
        for r, gflops in ((0, 2.0), (4, 1.5), ([4, -1.0], 1.2)):
            base = rng.random(300) < 0.7
            other = np.where(rng.random(300) < 0.1, ~base, base)
            third = np.where(rng.random(300) < 0.2, ~base, base)
            for protect, correct in (("prefix", base), ("class", other), ("apart", third)):
                write_run(tmp_path / str(job), r, protect, ckpt, correct, gflops)
                truth[(seed, json.dumps(r).replace(" ", ""), protect)] = correct
                job += 1
    return tmp_path, truth


def test_paired_report_against_hand_computation(sweep):
    folder, truth = sweep
    rows = collect(folder)
    assert swept_keys(rows) == ["protect", "checkpoint"]
    pooled = add_paired(rows, "protect", baseline="prefix")
    for row in rows:
        seed = int(row["checkpoint"].split("seed")[1][0])
        if row["protect"] == "prefix":
            assert row.get("delta_top1") is None
            continue
        base, run = truth[(seed, row["r"], "prefix")], truth[(seed, row["r"], row["protect"])]
        assert row["delta_top1"] == pytest.approx(100 * (run.mean() - base.mean()))
        b, c = int((base & ~run).sum()), int((~base & run).sum())
        assert row["p_value"] == pytest.approx(brute_force_mcnemar(b, c))
        assert row["ci_low"] <= row["delta_top1"] <= row["ci_high"]
    assert len(pooled) == 3 * 2  # one per r and compared value, over both checkpoints
    for row in pooled:
        base = np.concatenate([truth[(s, row["r"], "prefix")] for s in (0, 1)])
        run = np.concatenate([truth[(s, row["r"], row["protect"])] for s in (0, 1)])
        assert row["delta_top1"] == pytest.approx(100 * (run.mean() - base.mean()))


@pytest.mark.slow
def test_sweep_report_script_writes_paired_report_beside_the_plain_one(sweep):
    folder, truth = sweep
    script = [sys.executable, str(ROOT / "scripts" / "sweep_report.py"), str(folder)]
    subprocess.run(script, capture_output=True, text=True, check=True)
    plain = (folder / "sweep.csv").read_text()
    out = subprocess.run(
        script + ["--paired", "protect", "--baseline", "prefix"], capture_output=True, text=True, check=True
    )
    assert "2000 resamples" in out.stdout and "McNemar" in out.stdout
    assert (folder / "sweep.csv").read_text() == plain  # the plain report is not overwritten
    rows = list(csv.DictReader(open(folder / "paired_protect_vs_prefix.csv")))
    assert {"delta_top1", "ci_low", "ci_high", "p_value"} <= set(rows[0])
    assert sum(1 for r in rows if r["delta_top1"]) == 12 + 6  # class and apart: 12 paired runs + 6 pooled rows
    assert {r["protect"] for r in rows} == {"class", "apart"}
    # the third pair, by running again with another baseline; nothing earlier is replaced
    subprocess.run(script + ["--paired", "protect", "--baseline", "class"], capture_output=True, check=True)
    against_class = list(csv.DictReader(open(folder / "paired_protect_vs_class.csv")))
    apart = [r for r in against_class if r["protect"] == "apart" and r["checkpoint"] != "pooled"]
    for row in apart:
        seed = int(row["checkpoint"].split("seed")[1][0])
        base, run = truth[(seed, row["r"], "class")], truth[(seed, row["r"], "apart")]
        assert float(row["delta_top1"]) == pytest.approx(100 * (run.mean() - base.mean()))
    assert (folder / "paired_protect_vs_prefix.csv").exists()
    for name in ("paired_protect_vs_prefix.png", "paired_protect_vs_class.png", "sweep.png"):
        assert (folder / name).stat().st_size > 5000
    # settings shared by every run are said once, above the table, not in every row
    md = (folder / "sweep.md").read_text().splitlines()
    assert md[0].startswith("All runs: ") and "dataset cifar10" in md[0] and "dtype fp32" in md[0]
    assert "dtype" not in md[2] and "protect" in md[2]
    bad = subprocess.run(script + ["--paired", "protect", "--baseline", "none"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --baseline none: protect takes the values")


def test_runs_at_one_flop_budget_pair_across_modes_whatever_r_each_chose(tmp_path):
    """tome.flops picks r per protection mode (their caps differ): such runs pair by the budget, not by r."""
    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.6
    runs = {
        "prefix": ([12, -0.5], base),
        "apart": ([13, -1.0], np.where(rng.random(400) < 0.15, ~base, base)),
        "class": ([12, -1.0], np.where(rng.random(400) < 0.15, ~base, base)),
    }
    for job, (protect, (r, correct)) in enumerate(runs.items()):
        write_run(tmp_path / str(job), r, protect, "/runs/seed0/checkpoints/last.pt", correct, 0.06, 0.33)
    write_run(tmp_path / "3", 8, "prefix", "/runs/seed0/checkpoints/last.pt", base, 0.1)  # no partner: unpaired
    rows = collect(tmp_path)
    add_paired(rows, "protect", baseline="prefix")
    paired = {row["protect"]: row for row in rows if row.get("delta_top1") is not None}
    assert set(paired) == {"apart", "class"} and {row["schedule"] for row in paired.values()} == {"flops=0.33"}
    for protect, row in paired.items():
        assert row["delta_top1"] == pytest.approx(100 * (runs[protect][1].mean() - base.mean()))
    paths = write_report(rows, tmp_path, paired="protect", baseline="prefix")
    table = paths["paired_md"].read_text()
    assert "schedule flops=0.33" in table.splitlines()[0]  # said once above the table
    assert "[13,-1.0]" in table and "[12,-1.0]" in table  # each mode's r at that budget, in its row


def test_paired_key_that_was_not_swept_is_refused(sweep):
    folder, _ = sweep
    with pytest.raises(ReportError, match="the sweep has only prop_attn=True"):
        write_report(collect(folder), folder, paired="prop_attn")


def test_register_fates_against_a_hand_traced_case():
    """Brute force: follow every register through the source matrices of a tiny model, block by block."""
    import torch
    from conftest import make_vit

    import regtome
    from engine.report.register_fate import register_fates

    model = regtome.patch.timm(make_vit("class_reg4"), r=24, protect="class", trace_source=True)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    loader = [(images[:3], None), (images[3:], None)]
    summary = register_fates(model, loader, torch.device("cpu"))
    counts = torch.tensor(summary["counts"])
    assert counts.sum(dim=2).eq(6).all()  # every register of every image has exactly one fate per block
    expected = torch.zeros_like(counts)
    schedule = regtome.parse_r(4, 24)
    for block in range(4):
        with regtome.options(model, r=schedule[: block + 1]):
            model(images)
        source = regtome.last_forward(model).source
        for b in range(6):
            for j in range(4):
                (row,) = [t for t in range(source.shape[1]) if source[b, t, 1 + j] == 1]
                members = source[b, row].nonzero().flatten().tolist()
                fate = 2 if any(m >= 5 for m in members) else (1 if len(members) > 1 else 0)
                expected[block, j, fate] += 1
    assert torch.equal(counts, expected)
    assert counts[:, :, 1:].sum() > 0  # r=24 of 68 tokens: some registers do merge


def test_register_fates_under_apart_never_reach_a_patch():
    import torch
    from conftest import make_vit

    import regtome
    from engine.report.register_fate import register_fates

    model = regtome.patch.timm(make_vit("class_reg4"), r=24, trace_source=True)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    summary = register_fates(model, [(images, None)], torch.device("cpu"), protect="apart")
    counts = torch.tensor(summary["counts"])
    assert counts[:, :, 2].sum() == 0 and counts[:, :, 1].sum() > 0  # with registers, never with patches


def test_checkpoint_labels_name_the_run_folder_or_the_file():
    """Two checkpoints outside run folders must not share a label (they did: both were their grandparent)."""
    keys = ["checkpoint"]
    assert group_label({"checkpoint": "/x/train/seed0/checkpoints/last.pt"}, keys) == "checkpoint=seed0"
    labels = {group_label({"checkpoint": f"/x/snapshots/seed{i}_epoch6.pt"}, keys) for i in (0, 1)}
    assert labels == {"checkpoint=seed0_epoch6", "checkpoint=seed1_epoch6"}
    assert group_label({"checkpoint": "pooled"}, keys) == "checkpoint=pooled"


def test_the_paired_figure_names_each_schedule_once(sweep, tmp_path, monkeypatch):
    """Two modes at r=0 sit on one point (both equal the baseline): one label there, not 'r=0r=0'."""
    import matplotlib.axes

    from engine.report.sweep import plot_paired

    folder, _ = sweep
    rows = collect(folder)
    pooled = add_paired(rows, "protect", baseline="prefix")
    labels = []
    real = matplotlib.axes.Axes.annotate
    monkeypatch.setattr(
        matplotlib.axes.Axes, "annotate", lambda self, text, *a, **k: labels.append(text) or real(self, text, *a, **k)
    )
    plot_paired(rows + pooled, "protect", tmp_path / "paired.png", "prefix")
    assert sorted(labels) == ["r=0", "r=4", "r=[4,-1.0]"]


def test_sweep_png_joins_each_modes_runs_in_order_of_r_not_of_measured_speed(tmp_path, monkeypatch):
    """Images/s is measured, so a line sorted by it zig-zags whenever timing noise reorders two runs; each
    mode's line goes from the least merging to the most (r=16 measured slower than r=8 stays after it)."""
    from matplotlib.axes import Axes

    from engine.report.sweep import plot_sweep

    speed = {0: 100.0, 4: 160.0, 8: 150.0, 16: 140.0, 32: 210.0}  # noisy: not monotone in r
    modes = ("prefix", "apart")
    rows = [
        {"protect": mode, "r": str(r), "top1": 80.0 - r, "images_per_s": speed[r] + 3 * i, "gflops": 4.6 - 0.1 * r}
        for i, mode in enumerate(modes)
        for r in (16, 0, 32, 8, 4)
    ]
    drawn, plot = {}, Axes.plot

    def recording_plot(self, x, y, *args, **kwargs):  # the real plot, its points kept
        drawn[kwargs.get("label")] = list(x)
        return plot(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording_plot)
    plot_sweep(rows, tmp_path / "sweep.png")
    for i, mode in enumerate(modes):
        assert drawn[f"protect={mode}"] == [speed[r] + 3 * i for r in (0, 4, 8, 16, 32)]
    assert (tmp_path / "sweep.png").stat().st_size > 5000


def test_paired_files_are_named_for_any_baseline_value(sweep):
    """A baseline with a dot or a slash (a timm tag, a hub id, a checkpoint path) names three files beside sweep.csv
    (`with_suffix` cut `vit.a1` to `vit.csv`; a path made folders)."""
    folder, _ = sweep
    rows = collect(folder)
    for row in rows:  # two models, told apart by the seed of their old checkpoint
        row["model"] = "facebook/vit.a1" if "seed0" in row["checkpoint"] else "facebook/vit.b2"
    cases = [
        (collect(folder), "checkpoint", "/runs/seed0/checkpoints/best.pt", "paired_checkpoint_vs_seed0"),
        ([row | {"checkpoint": "one"} for row in rows], "model", "facebook/vit.a1", "paired_model_vs_facebook_vit.a1"),
    ]
    for table, key, baseline, stem in cases:
        out = folder / f"report_{key}"
        paths = write_report(table, out, paired=key, baseline=baseline)
        assert [paths[f"paired_{ext}"] for ext in ("csv", "md", "png")] == [
            out / f"{stem}.{ext}" for ext in ("csv", "md", "png")
        ]
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [f"{stem}.{e}" for e in ("csv", "md", "png")] + ["sweep.csv", "sweep.md", "sweep.png"]
        )
        assert len(list(csv.DictReader(open(paths["paired_csv"])))) > 0
