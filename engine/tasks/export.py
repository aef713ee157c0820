"""task=export: the merged model as ONNX (or a torch.export program), checked against PyTorch on real
images, optionally timed in onnxruntime against the exported unmerged model.

The merge schedule is baked into the graph; the batch axis is dynamic unless export.batch=N. The graph
has two outputs: `logits`, and `token_map` (B, N): for each token slot of the model's sequence, the
index of the output token that holds it, i.e. every merge decision of the pass. Parity compares both
with PyTorch: a sample whose logits differ while its token map is the same points at the arithmetic
(a defect); one whose token map differs met a near-tie in the matching (two similarities within
rounding of each other) that the other runtime's kernels decided the other way.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

import regtome
from data import class_names, count_classes
from data.images import load_images

from ..cli.overrides import config_from_checkpoint
from ..errors import UserError
from ..models.build import logits_of, model_label
from ..run.results import write_results
from ..run.session import open_session

log = logging.getLogger(__name__)
FORMATS = {"onnx": "model.onnx", "torch_export": "model.pt2"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TOLERANCE = 1e-4  # logits within this of PyTorch's count as equal


class Exportable(nn.Module):
    """A patched model as a graph with outputs (logits, token_map); an unpatched one gives logits only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> Any:
        if not regtome.is_patched(self.model):
            return logits_of(self.model(images))
        output, token_map = regtome.forward_with_token_map(self.model, images)
        return logits_of(output), token_map


def export_graph(
    module: nn.Module, example: torch.Tensor, path: Path, fmt: str, dynamic_batch: bool, opset: int
) -> None:
    """Write `module` traced on `example` to `path` as ONNX or a torch.export program."""
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    try:
        if fmt == "onnx":
            names = ["logits", "token_map"] if regtome.is_patched(module.model) else ["logits"]
            quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
            levels = [q.level for q in quiet]
            for q in quiet:
                q.setLevel(logging.WARNING)  # the exporter logs every pass it runs
            try:
                torch.onnx.export(
                    module,
                    (example,),
                    str(path),
                    dynamo=True,
                    opset_version=opset,
                    verbose=False,
                    input_names=["images"],
                    output_names=names,
                    dynamic_shapes=dynamic,
                    external_data=False,
                )
            finally:
                for q, level in zip(quiet, levels):
                    q.setLevel(level)
        else:
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
            torch.export.save(program, str(path))
    except Exception as err:
        path.unlink(missing_ok=True)
        reason = " ".join(str(err).strip().split())[:300]
        raise UserError(
            f"cannot export {type(module.model).__name__} as {fmt}: {type(err).__name__}: {reason}"
        ) from err


class Runner:
    """Runs an exported file: onnxruntime for ONNX, the loaded program for torch.export."""

    def __init__(self, path: Path, fmt: str, threads: int) -> None:
        self.fmt = fmt
        if fmt == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        else:
            self.program = torch.export.load(str(path)).module()

    def __call__(self, images: torch.Tensor) -> list[np.ndarray]:
        if self.fmt == "onnx":
            return self.session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            out = self.program(images)
        return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def parity(reference: tuple[np.ndarray, np.ndarray], exported: list[np.ndarray]) -> dict[str, Any]:
    """Per-sample max |logit difference|, the fraction within TOLERANCE, top-1 agreement, and for every
    sample that differs whether its merge decisions differ (near-tie) or only the arithmetic (defect)."""
    ref_logits, ref_map = reference
    logits, token_map = exported[0], exported[1] if len(exported) > 1 else None
    diff = np.abs(logits.astype(np.float64) - ref_logits.astype(np.float64)).max(axis=1)
    agree = logits.argmax(1) == ref_logits.argmax(1)
    differing = np.flatnonzero((diff > TOLERANCE) | ~agree)
    same_decisions = (token_map == ref_map).all(axis=1) if token_map is not None else np.ones(len(diff), bool)
    samples = [
        {
            "index": int(i),
            "max_abs_diff": float(diff[i]),
            "top1_agrees": bool(agree[i]),
            "cause": "arithmetic (defect)" if same_decisions[i] else "merge decision (near-tie)",
        }
        for i in differing
    ]
    return {
        "samples": len(diff),
        "max_abs_diff": float(diff.max()),
        "median_abs_diff": float(np.median(diff)),
        "within_tolerance": float((diff <= TOLERANCE).mean()),
        "tolerance": TOLERANCE,
        "top1_agreement": float(agree.mean()),
        "near_ties": sum(s["cause"].startswith("merge") for s in samples),
        "defects": sum(s["cause"].startswith("arith") for s in samples),
        "differing": samples,
    }


def reference_outputs(module: Exportable, images: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
    outs = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            out = module(images[start : start + batch])
            outs.append(out if isinstance(out, tuple) else (out, torch.zeros(len(out), 1, dtype=torch.long)))
    return (torch.cat([o[0] for o in outs]).float().numpy(), torch.cat([o[1] for o in outs]).numpy())


def run_exported(runner: Runner, images: torch.Tensor, batch: int) -> list[np.ndarray]:
    parts = [runner(images[start : start + batch]) for start in range(0, len(images), batch)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]


def time_runtimes(runners: dict[str, Runner], images: torch.Tensor, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per batch of each runner, interleaved (each repeat runs every case in turn)."""
    for runner in runners.values():
        for _ in range(warmup):
            runner(images)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(images)
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def check_export_config(export: DictConfig) -> tuple[str, Optional[int], torch.dtype]:
    if export.format not in FORMATS:
        raise UserError(f"export.format={export.format}: choose one of {', '.join(FORMATS)}")
    if export.dtype not in DTYPES:
        raise UserError(f"export.dtype={export.dtype}: choose fp32 or fp16")
    batch = export.batch
    if batch != "dynamic" and not (isinstance(batch, int) and batch >= 1):
        raise UserError(f"export.batch={batch}: 'dynamic' or an int >= 1")
    return export.format, None if batch == "dynamic" else int(batch), DTYPES[export.dtype]


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    fmt, fixed_batch, dtype = check_export_config(cfg.export)
    cfg, weights, saved_classes = config_from_checkpoint(cfg, overrides)
    if weights is None and not (cfg.model.pretrained or cfg.model.pretrained_file or cfg.model.get("pretrained_dir")):
        raise UserError("task=export needs weights: ckpt=PATH, model.pretrained=true or model.pretrained_file=PATH")
    session = open_session(cfg, count_classes(cfg.dataset), weights, cfg.ckpt, distributed=False)
    model = session.model.cpu().eval().to(dtype)
    images = torch.stack(
        [
            t
            for _, t, _ in load_images(
                cfg, session.inputs, saved_classes or class_names(cfg.dataset), int(cfg.export.samples)
            )
        ]
    ).to(dtype)
    merged = Exportable(model).eval()
    example_batch = fixed_batch or 2
    path = run_dir / FORMATS[fmt]
    export_graph(merged, images[:example_batch], path, fmt, fixed_batch is None, int(cfg.export.opset))
    threads = max(1, torch.get_num_threads())
    batch = fixed_batch or 8
    report = parity(reference_outputs(merged, images, batch), run_exported(Runner(path, fmt, threads), images, batch))
    if report["top1_agreement"] < float(cfg.export.min_agreement):
        path.unlink(missing_ok=True)
        raise UserError(
            f"export refused: top-1 agreement with PyTorch is {100 * report['top1_agreement']:.2f}% on "
            f"{report['samples']} images, below export.min_agreement={cfg.export.min_agreement} "
            f"({report['near_ties']} near-ties, {report['defects']} arithmetic differences); "
            f"{path.name} was not kept"
        )
    record = export_record(cfg, model, fmt, fixed_batch, dtype, report)
    if cfg.export.benchmark:
        record["benchmark"] = benchmark_exports(model, merged, path, fmt, images, cfg, run_dir, threads)
    write_results(run_dir, record)
    log.info(
        "exported %s (r=%s, protect=%s) to %s; top-1 agreement %.2f%%, %.1f%% of samples within %.0e",
        record["model"],
        record["r"],
        record["protect"],
        path,
        100 * report["top1_agreement"],
        100 * report["within_tolerance"],
        TOLERANCE,
    )
    print(f"wrote {path} and {run_dir / 'results.json'}")
    return record


def export_record(
    cfg: DictConfig, model: nn.Module, fmt: str, fixed_batch: Optional[int], dtype: torch.dtype, report: dict[str, Any]
) -> dict[str, Any]:
    record = regtome.last_forward(model)
    return {
        "task": "export",
        "format": fmt,
        "file": FORMATS[fmt],
        "model": model_label(cfg.model),
        "checkpoint": cfg.get("ckpt"),
        "r": OmegaConf.to_container(cfg.tome, resolve=True)["r"],
        "r_per_block": list(record.r),
        "tokens_per_block": list(record.tokens),
        "protect": model.protect,
        "prop_attn": model.prop_attn,
        "opset": int(cfg.export.opset) if fmt == "onnx" else None,
        "dtype": cfg.export.dtype,
        "batch": fixed_batch or "dynamic",
        "input_size": list(regtome.input_size(model)),
        "outputs": ["logits", "token_map"],
        "parity": report,
        "torch": torch.__version__,
    }


def benchmark_exports(
    model: nn.Module,
    merged: Exportable,
    path: Path,
    fmt: str,
    images: torch.Tensor,
    cfg: DictConfig,
    run_dir: Path,
    threads: int,
) -> dict[str, Any]:
    """The merged export against the exported unmerged model, interleaved medians, with the FLOP-ideal."""
    if fmt != "onnx":
        raise UserError("export.benchmark=true times onnxruntime: use export.format=onnx")
    batch = int(cfg.export.batch_size)
    unmerged_path = run_dir / "unmerged.onnx"
    baseline = Exportable(regtome.remove_patch(copy.deepcopy(model))).eval()
    export_graph(baseline, images[:2], unmerged_path, fmt, True, int(cfg.export.opset))
    inputs = images[:batch] if len(images) >= batch else images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch]
    runners = {"unmerged": Runner(unmerged_path, fmt, threads), "merged": Runner(path, fmt, threads)}
    seconds = time_runtimes(runners, inputs, int(cfg.export.repeats))
    size = regtome.input_size(model)
    ideal = regtome.schedule_gflops(model, 0, size) / regtome.vit_flops(model, size)
    speedup = seconds["unmerged"] / seconds["merged"]
    return {
        "runtime": "onnxruntime (CPU)",
        "threads": threads,
        "batch_size": batch,
        "repeats": int(cfg.export.repeats),
        "images_per_s": {k: batch / v for k, v in seconds.items()},
        "speedup": speedup,
        "flop_speedup": ideal,
        "of_ideal": speedup / ideal,
        "unmerged_file": unmerged_path.name,
    }
