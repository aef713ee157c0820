"""task=export: the merged model as ONNX (or a torch.export program), checked against PyTorch on real images,
optionally timed in onnxruntime against the exported unmerged model. The merge schedule is baked into the graph;
the batch axis is dynamic unless export.batch=N. Its outputs are `logits` and `token_map` (B, N): for each token
slot, the output token that holds it (every merge decision of the pass). A sample whose logits differ from
PyTorch's while its token map is the same points at the arithmetic (a defect); one whose token map differs met a
near-tie in the matching that the other runtime's kernels decided the other way."""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig

import regtome
from data import count_classes, preprocessing
from data.images import load_images

from ..errors import UserError, first_line
from ..measure.timing import interleaved_seconds
from ..models.build import WEIGHTS_HINT, has_weights, logits_of, model_label
from ..run.checkpoint import config_from_checkpoint, label_order
from ..run.console import ctrl_c_after_this
from ..run.results import merge_record, r_that_ran, write_results
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


def runner(path: Path, fmt: str, threads: int) -> Callable[[torch.Tensor], Any]:
    """Runs an exported file: onnxruntime for ONNX, the loaded program for torch.export."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"images": images.numpy()})
    return torch.export.load(str(path)).module()


def outputs_of(call: Callable[[torch.Tensor], Any], images: torch.Tensor, batch: int) -> list[np.ndarray]:
    """Each output of `call` (the PyTorch module or an exported file's runner) over `images`, `batch` at a time."""
    with torch.no_grad():
        parts = [call(images[start : start + batch]) for start in range(0, len(images), batch)]
    parts = [part if isinstance(part, (tuple, list)) else [part] for part in parts]
    return [np.concatenate([np.asarray(p[i]) for p in parts]) for i in range(len(parts[0]))]


def parity(reference: Sequence[np.ndarray], exported: Sequence[np.ndarray]) -> dict[str, Any]:
    """Per-sample max |logit difference|, the fraction within TOLERANCE, top-1 agreement, and for every
    sample that differs whether its merge decisions differ (near-tie) or only the arithmetic (defect)."""
    ref_logits, logits = reference[0], exported[0]
    diff = np.abs(logits.astype(np.float64) - ref_logits.astype(np.float64)).max(axis=1)
    agree = logits.argmax(1) == ref_logits.argmax(1)
    differing = np.flatnonzero((diff > TOLERANCE) | ~agree)
    same_decisions = (exported[1] == reference[1]).all(axis=1) if len(exported) > 1 else np.ones(len(diff), bool)
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


def export_graph(
    module: nn.Module, example: torch.Tensor, path: Path, fmt: str, dynamic_batch: bool, opset: int
) -> None:
    """Write `module` traced on `example` to `path` as ONNX or a torch.export program; no half-written file. A
    Ctrl-C waits for the trace to end (an interrupt inside torch's tracer can crash the process)."""
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with ctrl_c_after_this(f"the {fmt} trace (up to a few minutes)"):
        try:
            if fmt == "onnx":
                with contextlib.ExitStack() as restore:
                    for quiet in map(logging.getLogger, ("onnx_ir", "onnxscript", "torch.onnx")):
                        restore.callback(quiet.setLevel, quiet.level)
                        quiet.setLevel(logging.WARNING)  # the exporter logs every pass it runs
                    torch.onnx.export(
                        module,
                        (example,),
                        str(path),
                        dynamo=True,
                        opset_version=opset,
                        verbose=False,
                        input_names=["images"],
                        output_names=["logits", "token_map"] if regtome.is_patched(module.model) else ["logits"],
                        dynamic_shapes=dynamic,
                        external_data=False,
                    )
            else:
                torch.export.save(torch.export.export(module, (example,), dynamic_shapes=dynamic), str(path))
        except BaseException as err:
            path.unlink(missing_ok=True)
            if isinstance(err, ImportError):  # what a user can fix: the exporter's packages are missing
                raise UserError(
                    f"export.format={fmt} needs a package that is not installed ({first_line(err)}); "
                    "pip install onnx onnxscript onnxruntime, or use export.format=torch_export"
                ) from err
            raise  # the exporter's own failure is a bug to report with its traceback


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    fmt, dtype = cfg.export.format, DTYPES[cfg.export.dtype]  # words and ranges checked by engine/schema.py
    fixed_batch = None if cfg.export.batch == "dynamic" else cfg.export.batch
    cfg, saved = config_from_checkpoint(cfg, overrides)
    if saved is None and not has_weights(cfg.model):
        raise UserError(f"task=export needs weights: {WEIGHTS_HINT}")
    weights = saved.weights if saved else None
    session = open_session(cfg, count_classes(cfg.dataset), weights, cfg.ckpt, distributed=False)
    model = session.model.cpu().eval().to(dtype)
    classes = label_order(cfg.dataset, saved)
    images = torch.stack([t for _, t, _ in load_images(cfg, session.inputs, classes, cfg.export.samples)]).to(dtype)
    path, label = run_dir / FORMATS[fmt], model_label(cfg.model)
    merged = Exportable(model).eval()
    threads, batch = max(1, torch.get_num_threads()), fixed_batch or 8
    try:
        merge = merge_record(model, regtome.input_size(model))
        log.info(f"exporting {label} (r={r_that_ran(merge)}, protect={model.protect}) as {fmt} to {path}")
        export_graph(merged, images[: fixed_batch or 2], path, fmt, fixed_batch is None, cfg.export.opset)
        report = parity(outputs_of(merged, images, batch), outputs_of(runner(path, fmt, threads), images, batch))
        if report["top1_agreement"] < cfg.export.min_agreement:
            raise UserError(
                f"export refused: top-1 agreement with PyTorch is {100 * report['top1_agreement']:.2f}% on "
                f"{report['samples']} images, below export.min_agreement={cfg.export.min_agreement} "
                f"({report['near_ties']} near-ties, {report['defects']} arithmetic differences); "
                f"{path.name} was not kept"
            )
        record = {
            "task": "export",
            "format": fmt,
            "file": FORMATS[fmt],
            "model": label,
            "checkpoint": cfg.ckpt,
            **merge,
            "prop_attn": model.prop_attn,
            "opset": cfg.export.opset if fmt == "onnx" else None,
            "dtype": cfg.export.dtype,
            "batch": fixed_batch or "dynamic",
            "input_size": list(regtome.input_size(model)),
            "outputs": ["logits", "token_map"],
            "parity": report,
            "torch": torch.__version__,
        }
        if cfg.export.benchmark:
            if fmt != "onnx":
                raise UserError("export.benchmark=true times onnxruntime: use export.format=onnx")
            record["benchmark"] = benchmark_exports(model, path, images, cfg, threads)
        record["preprocessing"] = preprocessing(cfg.dataset, session.inputs)
    except BaseException:  # refused, failed or interrupted (Ctrl-C): no export file without its parity report
        for leftover in (path, run_dir / "unmerged.onnx"):
            leftover.unlink(missing_ok=True)
        raise
    write_results(run_dir, record)
    log.info(
        f"exported {label} (r={r_that_ran(record)}, protect={record['protect']}) to {path}; top-1 "
        f"agreement {100 * report['top1_agreement']:.2f}%, {100 * report['within_tolerance']:.1f}% "
        f"of samples within {TOLERANCE:.0e}"
    )
    print(f"wrote {path} and {run_dir / 'results.json'}")
    return record


def benchmark_exports(
    model: nn.Module, path: Path, images: torch.Tensor, cfg: DictConfig, threads: int
) -> dict[str, Any]:
    """The merged export (`path`) against the exported unmerged model, interleaved medians, with the FLOP-ideal."""
    batch = cfg.export.batch_size
    unmerged_path = path.parent / "unmerged.onnx"
    baseline = Exportable(regtome.remove_patch(copy.deepcopy(model))).eval()
    export_graph(baseline, images[:2], unmerged_path, "onnx", True, cfg.export.opset)
    inputs = images[:batch] if len(images) >= batch else images.repeat(-(-batch // len(images)), 1, 1, 1)[:batch]
    runners = {"unmerged": runner(unmerged_path, "onnx", threads), "merged": runner(path, "onnx", threads)}
    calls = {name: (lambda run=run: run(inputs)) for name, run in runners.items()}  # one batch each
    seconds = interleaved_seconds(calls, torch.device("cpu"), warmup=2, repeats=cfg.export.repeats, iters=1)
    size = regtome.input_size(model)
    ideal = regtome.schedule_gflops(model, 0, size) / regtome.vit_flops(model, size)
    speedup = seconds["unmerged"] / seconds["merged"]
    return {
        "runtime": "onnxruntime (CPU)",
        "threads": threads,
        "batch_size": batch,
        "repeats": cfg.export.repeats,
        "images_per_s": {k: batch / v for k, v in seconds.items()},
        "speedup": speedup,
        "flop_speedup": ideal,
        "of_ideal": speedup / ideal,
        "unmerged_file": unmerged_path.name,
    }
