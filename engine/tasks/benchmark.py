"""task=benchmark: what merging buys. Images/s (inference and training step), peak memory, GFLOPs.

Every case runs in this one process on random input (only the model is timed), interleaved with
the unpatched timm model, after warm-up, under the configured AMP dtype; medians of several repeats.
"""

from __future__ import annotations

import copy
import logging
import resource
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import timm
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import regtome
from data import count_classes

from ..errors import UserError
from ..models.build import logits_of, model_label, r_option
from ..report.benchmark_report import write_outputs
from ..report.loader_timing import data_bound_notes, time_train_loader
from ..report.timing import interleaved_seconds
from ..run.results import write_results
from ..run.runtime import autocast, device_name, dtype_name, synchronize
from ..run.session import open_session

log = logging.getLogger(__name__)
BASELINE = "unpatched"  # the model as timm or transformers built it


def schedule_label(r: Any) -> str:
    """'unpatched' for the model as built, '16' or '(16,-1.0)' for an r, '16 apart' for options {r, protect}."""
    if r is None:
        return BASELINE
    if isinstance(r, dict):
        return " ".join(str(v).replace(" ", "") for v in r.values())
    return str(r).replace(" ", "")


def peak_memory_mb(device: torch.device, fn: Callable[[], object]) -> float:
    """Peak memory while `fn` runs: CUDA peak allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux: reset the peak RSS (VmHWM) to the current RSS
        fn()
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except OSError:  # elsewhere: the process's lifetime peak, an upper bound
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _schedule(model: nn.Module, r: Any) -> ContextManager:
    """The model at schedule r, or at the patch options of a dict such as {"r": 16, "protect": "apart"}
    (None: the unpatched baseline, as it is)."""
    if r is None:
        return nullcontext()
    return regtome.options(model, **r) if isinstance(r, dict) else regtome.options(model, r=r)


def _inference(model: nn.Module, images: torch.Tensor, r: Any, device: torch.device, dtype) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(device, dtype), _schedule(model, r):
            model(images)

    return step


def _dense(model: nn.Module, images: torch.Tensor, r: Any, device: torch.device, dtype) -> Callable[[], None]:
    """Patch features of the last block on the full grid (timm's forward_intermediates)."""

    def step() -> None:
        with torch.inference_mode(), autocast(device, dtype), _schedule(model, r):
            model.forward_intermediates(images, indices=1, intermediates_only=True)

    return step


def _train_step(model: nn.Module, images: torch.Tensor, r: Any, device: torch.device, dtype) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    targets = torch.zeros(images.shape[0], dtype=torch.long, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        with autocast(device, dtype), _schedule(model, r):
            loss = nn.functional.cross_entropy(logits_of(model(images)), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


@dataclass(frozen=True)
class Timing:
    """How each case is timed: median of `repeats`, each `iters` calls, after `warmup` calls."""

    warmup: int = 2
    repeats: int = 5
    iters: int = 3
    train_step: bool = True  # also time forward + backward + optimizer step
    dense: bool = False  # also time dense features on the full grid (forward_intermediates)


def benchmark_rows(
    baseline: nn.Module,
    merged: nn.Module,
    schedules: list[Any],
    batch_sizes: list[int],
    bench: Timing,
    device: torch.device,
    dtype,
) -> list[dict[str, Any]]:
    """Inference (and training step) images/s of `merged` at each schedule against `baseline`."""
    size = regtome.input_size(merged)[1:]
    gflops = {BASELINE: regtome.schedule_gflops(merged, 0, (3, *size))}  # the unpatched model's count
    for r in schedules:
        with _schedule(merged, r):
            gflops[schedule_label(r)] = regtome.vit_flops(merged, (3, *size))
    modes = (
        {"inference": _inference}
        | ({"train": _train_step} if bench.train_step else {})
        | ({"dense": _dense} if bench.dense and hasattr(merged, "forward_intermediates") else {})
    )
    steps = len(batch_sizes) * len(modes) * bench.repeats * (len(schedules) + 1)
    bar = tqdm(total=steps, desc="benchmark", dynamic_ncols=True)
    rows = []
    for batch in batch_sizes:
        images = torch.randn(batch, 3, *size, device=device)
        for mode, make in modes.items():
            baseline.train(mode == "train")  # dense and inference: eval mode
            merged.train(mode == "train")
            cases = {BASELINE: make(baseline, images, None, device, dtype)}
            cases |= {schedule_label(r): make(merged, images, r, device, dtype) for r in schedules}
            seconds = interleaved_seconds(
                cases,
                device,
                warmup=bench.warmup,
                repeats=bench.repeats,
                iters=bench.iters,
                progress=lambda: bar.update(1),
            )
            for label, fn in cases.items():
                speedup = seconds[BASELINE] / seconds[label]
                ideal = gflops[BASELINE] / gflops[label]
                rows.append(
                    {
                        "mode": mode,
                        "r": label,
                        "batch_size": batch,
                        "images_per_s": batch / seconds[label],
                        "speedup": speedup,
                        "gflops": gflops[label],
                        "flop_speedup": ideal,
                        "of_ideal": speedup / ideal,
                        "peak_memory_mb": peak_memory_mb(device, fn),
                    }
                )
    bar.close()
    return rows


def schedule_for_speedup(
    baseline: nn.Module,
    merged: nn.Module,
    target: float,
    batch: int,
    bench: Timing,
    device: torch.device,
    dtype,
    tries: int = 6,
) -> dict[str, Any]:
    """The least merging whose measured inference speedup reaches `target` on this device.

    Starts at the FLOP budget 1/target (`regtome.r_for_flops`; no schedule reaches a speedup with
    fewer FLOPs saved, short of overheads vanishing) and lowers the budget by 0.05 until it is reached.
    """
    size = regtome.input_size(merged)
    images = torch.randn(batch, *size, device=device)
    baseline.eval()
    merged.eval()
    tried: list[dict[str, Any]] = []
    fraction = min(1.0, 1.0 / target)
    for _ in range(tries):
        try:
            r = regtome.r_for_flops(merged, fraction, size)
        except ValueError:
            break
        cases = {
            BASELINE: _inference(baseline, images, None, device, dtype),
            "merged": _inference(merged, images, r, device, dtype),
        }
        seconds = interleaved_seconds(cases, device, warmup=bench.warmup, repeats=bench.repeats, iters=bench.iters)
        speedup = seconds[BASELINE] / seconds["merged"]
        tried.append({"r": schedule_label(r), "flop_fraction": fraction, "speedup": speedup})
        if speedup >= target:
            return {
                "target_speedup": target,
                "batch_size": batch,
                "r": schedule_label(r),
                "speedup": speedup,
                "tried": tried,
            }
        fraction -= 0.05
    return {"target_speedup": target, "batch_size": batch, "r": None, "tried": tried}


def batch_one_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Merging costs fixed work per block; at batch 1 that can outweigh the savings."""
    return [
        f"merging does not pay off at batch 1 for r={row['r']} ({row['mode']}: {row['speedup']:.2f}x)"
        for row in rows
        if row["batch_size"] == 1 and row["r"] != BASELINE and row["flop_speedup"] > 1.0 and row["speedup"] < 1.0
    ]


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> list[dict[str, Any]]:
    bench = cfg.benchmark
    schedules = [r_option(r, "benchmark.r entry") for r in OmegaConf.to_container(bench.r, resolve=True)]
    batch_sizes = list(bench.batch_sizes)
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise UserError(f"benchmark.batch_sizes must be a list of ints >= 1, got {batch_sizes}")
    session = open_session(cfg, count_classes(cfg.dataset), distributed=False)
    merged, device, dtype = session.model, session.device, session.dtype
    for r in schedules:
        try:
            with regtome.options(merged, r=r):  # checks r against the model: fail before timing anything
                pass
        except ValueError as err:
            raise UserError(f"benchmark.r entry {r}: {err}") from err
    baseline = regtome.remove_patch(copy.deepcopy(merged))
    timing = Timing(
        warmup=bench.warmup, repeats=bench.repeats, iters=bench.iters, train_step=bench.train_step, dense=bench.dense
    )
    rows = benchmark_rows(baseline, merged, schedules, batch_sizes, timing, device, dtype)
    target = None
    if bench.target_speedup is not None:
        if not bench.target_speedup > 1:
            raise UserError(f"benchmark.target_speedup must be > 1, got {bench.target_speedup}")
        target = schedule_for_speedup(
            baseline, merged, float(bench.target_speedup), max(batch_sizes), timing, device, dtype
        )
    meta = {
        "model": model_label(cfg.model),
        "registers": regtome.prefix_layout(merged).num_register,
        "img_size": cfg.model.img_size,
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    loader = time_train_loader(cfg, session) if bench.loader else {"error": "benchmark.loader=false"}
    notes = batch_one_notes(rows) + data_bound_notes(loader, rows)
    if target is not None:
        tried = ", ".join(f"r={t['r']} {t['speedup']:.2f}x" for t in target["tried"])
        notes.append(
            f"target speedup {target['target_speedup']}x at batch {target['batch_size']}: "
            + (f"reached by r={target['r']} ({target['speedup']:.2f}x)" if target["r"] else "not reached")
            + f" (tried {tried})"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(rows, meta, notes, run_dir)
    write_results(
        run_dir,
        {
            "task": "benchmark",
            **meta,
            "batch_sizes": batch_sizes,
            "rows": rows,
            "loader": loader,
            "target_speedup": target,
            "notes": notes,
        },
    )
    log.info("\n%s", (run_dir / "benchmark.md").read_text())
    return rows
