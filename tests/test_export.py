"""task=export: merged models exported to ONNX / torch.export, checked against PyTorch (issue #21).

Per family, on a batch size other than the export's: the exported logits and the token map (every
merge decision) equal PyTorch's. The CLI on model=vit_tiny_test, and the refusal paths.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnxruntime  # noqa: F401  (task=export needs it: a missing package fails, never skips)
import pytest
import torch
from conftest import make_vit  # noqa: E402
from test_families import build, images_for  # noqa: E402

import regtome  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.tasks.export import Exportable, export_graph, outputs_of, parity, runner  # noqa: E402

warnings.filterwarnings("ignore")


def export_and_compare(model, images, tmp_path, fmt="onnx", example_batch=2):
    module = Exportable(model).eval()
    path = tmp_path / ("model.onnx" if fmt == "onnx" else "model.pt2")
    logging.disable(logging.INFO)
    try:
        export_graph(module, images[:example_batch], path, fmt, dynamic_batch=True, opset=18)
    finally:
        logging.disable(logging.NOTSET)
    batch = len(images)  # not the export's batch: the batch axis is dynamic
    reference = outputs_of(module, images, batch)
    exported = outputs_of(runner(path, fmt, threads=1), images, batch)
    return parity(reference, exported), reference, exported


@pytest.mark.parametrize(
    "family,protect",
    [
        ("class_reg4", "prefix"),  # VisionTransformer, class token + registers
        ("gap_reg4", "class"),  # average pooling
        ("reg4_map", "apart"),  # attention pooling
        ("dinov3", "apart"),  # Eva, RoPE, storage tokens
    ],
)
@pytest.mark.slow
def test_export_matches_pytorch_per_family_and_protection_mode(family, protect, tmp_path):
    model = make_vit(family, depth=2) if family in ("class_reg4", "gap_reg4") else build(family, depth=2)
    regtome.patch.timm(model, r=(6, -1.0), protect=protect)
    images = images_for(model, batch=5) if family not in ("class_reg4", "gap_reg4") else torch.randn(5, 3, 32, 32)
    report, (ref_logits, ref_map), exported = export_and_compare(model, images, tmp_path)
    assert report["top1_agreement"] == 1.0 and report["within_tolerance"] == 1.0, report
    assert np.array_equal(exported[1], ref_map)  # the same merge decisions, image by image
    assert ref_map.shape == (5, model.num_prefix_tokens + model.patch_embed.num_patches)
    assert exported[0].shape == ref_logits.shape


@pytest.mark.slow
def test_torch_export_and_a_transformers_model(tmp_path):
    from test_transformers import build as build_hf
    from test_transformers import images as hf_images

    model = regtome.patch.transformers(build_hf("dinov2_reg_classifier"), r=4, protect="apart")
    report, _, exported = export_and_compare(model, hf_images(3), tmp_path, fmt="torch_export")
    assert report["top1_agreement"] == 1.0 and report["max_abs_diff"] <= 1e-5
    assert exported[1].shape == (3, 1 + 4 + 64)


def test_parity_tells_near_ties_from_arithmetic_defects():
    logits = np.zeros((4, 3), dtype=np.float32)
    logits[:, 0] = 1.0
    token_map = np.tile(np.arange(6), (4, 1))
    exported_logits, exported_map = logits.copy(), token_map.copy()
    exported_logits[1, 1] = 2.0  # top-1 flips, token map unchanged: arithmetic
    exported_logits[2, 2] = 0.5  # differs, token map differs too: a merge decided the other way
    exported_map[2, [3, 4]] = exported_map[2, [4, 3]]
    report = parity((logits, token_map), [exported_logits, exported_map])
    assert report["top1_agreement"] == 0.75 and report["within_tolerance"] == 0.5
    causes = {s["index"]: s["cause"] for s in report["differing"]}
    assert causes == {1: "arithmetic (defect)", 2: "merge decision (near-tie)"}
    assert (report["near_ties"], report["defects"]) == (1, 1)


def test_the_exporters_own_failure_is_a_bug_with_its_traceback_and_leaves_no_file(tmp_path):
    """Not a user's mistake (nothing on the command line fixes it): the exporter's error goes up as it is."""

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # a branch on a value: no graph for it

    with pytest.raises(Exception) as raised:
        export_graph(Exportable(DataDependent()), torch.randn(2, 3), tmp_path / "m.pt2", "torch_export", True, 18)
    assert not isinstance(raised.value, UserError)
    assert not (tmp_path / "m.pt2").exists()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """vit_tiny_test's weights as a timm file (model.pretrained_file), for the CLI without a checkpoint."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(
        "vit_small_patch16_224",
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        reg_tokens=4,
        num_classes=4,
    )
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path


@pytest.mark.slow
def test_cli_exports_checks_and_times(tmp_path, weights):
    from cli_helpers import SMOKE, results, run_main

    args = [
        "task=export",
        *[o for o in SMOKE if not o.startswith("tome.r")],
        "tome.r=4",
        "tome.protect=apart",
        f"model.pretrained_file={weights}",
        "export.samples=32",
        "export.benchmark=true",
        "export.repeats=2",
        f"hydra.run.dir={tmp_path / 'export'}",
    ]
    out = run_main(*args, cwd=tmp_path)
    assert f"wrote {tmp_path / 'export' / 'model.onnx'}" in out.stdout
    record = results(tmp_path / "export")
    assert record["format"] == "onnx" and record["batch"] == "dynamic" and record["opset"] == 18
    assert record["r_per_block"] == [4, 4] and record["protect"] == "apart" and record["input_size"] == [3, 32, 32]
    assert record["parity"]["samples"] == 32 and record["parity"]["top1_agreement"] == 1.0
    bench = record["benchmark"]
    assert bench["runtime"] == "onnxruntime (CPU)" and bench["flop_speedup"] > 1
    rates = bench["images_per_s"]  # the speedup pairs the two exported files' interleaved medians
    assert bench["speedup"] == pytest.approx(rates["merged"] / rates["unmerged"], rel=1e-6)
    assert (tmp_path / "export" / "unmerged.onnx").exists()


@pytest.mark.slow
def test_cli_refuses_an_export_below_the_agreement_and_keeps_no_file(tmp_path, weights):
    from cli_helpers import SMOKE, run_main
    from test_mistakes import one_line_error

    args = [
        "task=export",
        *SMOKE,
        f"model.pretrained_file={weights}",
        "export.samples=8",
        "export.min_agreement=1.01",
        f"hydra.run.dir={tmp_path / 'refused'}",
    ]
    line = one_line_error(run_main(*args, cwd=tmp_path, check=False))
    assert (
        line.startswith(
            "error: export refused: top-1 agreement with PyTorch is 100.00% on 8 images, below "
            "export.min_agreement=1.01"
        )
        and "model.onnx was not kept" in line
    )
    assert not (tmp_path / "refused").exists()
