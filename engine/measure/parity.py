"""An export checked against PyTorch: run it (onnxruntime or the torch.export program) and compare the logits
and merge decisions sample by sample (timing it against the unmerged export is `timing.interleaved_seconds`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

TOLERANCE = 1e-4  # logits within this of PyTorch's count as equal


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


def reference_outputs(module: nn.Module, images: torch.Tensor, batch: int) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        outs = [module(images[start : start + batch]) for start in range(0, len(images), batch)]
    outs = [out if isinstance(out, tuple) else (out, torch.zeros(len(out), 1, dtype=torch.long)) for out in outs]
    return (torch.cat([o[0] for o in outs]).float().numpy(), torch.cat([o[1] for o in outs]).numpy())


def run_exported(runner: Runner, images: torch.Tensor, batch: int) -> list[np.ndarray]:
    parts = [runner(images[start : start + batch]) for start in range(0, len(images), batch)]
    return [np.concatenate([p[i] for p in parts]) for i in range(len(parts[0]))]
