"""What merging buys, measured fairly: images/s and latency of the patched model against the unpatched one,
eager and compiled, for inference, the training step and dense features; every case on random input (only the
model is timed) through `timing.timed_calls`, under the configured AMP dtype."""

from __future__ import annotations

import resource
import statistics
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

import regtome

from ..models.build import logits_of
from ..models.tome_group import compact
from ..run.results import merge_record
from ..run.runtime import autocast, synchronize
from ..run.session import compile_model
from .timing import interleaved_seconds, timed_calls

BASELINE = "unpatched"  # the model as timm or transformers built it
Step = Callable[[], None]
Case = tuple[str, str]  # (way of running, schedule label)
Pair = tuple[nn.Module, nn.Module]  # (unpatched, patched) models, run one way


def schedule_label(r: Any) -> str:
    """'unpatched' for the model as built, '16' or '(16,-1.0)' for an r, '16 apart' for options {r, protect}."""
    if r is None:
        return BASELINE
    return " ".join(compact(v) for v in r.values()) if isinstance(r, dict) else compact(r)


def peak_memory_mb(device: torch.device, fn: Step) -> float:
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


def _schedule(patched: Optional[nn.Module], r: Any) -> ContextManager:
    """The patched model at schedule r or at the options of a dict ({"r": 16, "protect": "apart"}); none for r None."""
    if r is None or patched is None:
        return nullcontext()
    return regtome.options(patched, **r) if isinstance(r, dict) else regtome.options(patched, r=r)


def schedule_records(merged: nn.Module, schedules: list[Any], size: tuple[int, int, int]) -> dict[str, dict[str, Any]]:
    """The merging each schedule runs (`merge_record` at its options), by the label its rows carry."""
    records = {}
    for r in schedules:
        with _schedule(merged, r):
            records[schedule_label(r)] = merge_record(merged, size)
    return records


def _step(mode: str, model: nn.Module, patched: Optional[nn.Module], images: torch.Tensor, r: Any, dtype: Any) -> Step:
    """A call of `model` (eager or compiled) on `images` (on the device timed) with the options of `patched` (the
    plain patched module inside it, None for the unpatched baseline) set to schedule r. inference: a forward
    without gradients; dense: patch features of the last block on the full grid (timm's forward_intermediates;
    eager only); train: forward, backward and an AdamW step (a tiny learning rate: the weights barely move)."""
    device = images.device
    if mode != "train":

        def forward() -> None:
            with torch.inference_mode(), autocast(device, dtype), _schedule(patched, r):
                if mode == "dense":
                    model.forward_intermediates(images, indices=1, intermediates_only=True)
                else:
                    model(images)

        return forward
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    targets = torch.zeros(images.shape[0], dtype=torch.long, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def train() -> None:
        with autocast(device, dtype), _schedule(patched, r):
            loss = nn.functional.cross_entropy(logits_of(model(images)), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return train


@dataclass(frozen=True, kw_only=True)
class Timing:
    """How and where each case is timed: `repeats` rounds of `iters` calls each, after `warmup` calls, on random
    images of `size` (C, H, W; None: the model's own) on `device`, under the AMP `dtype` (None: fp32)."""

    device: torch.device
    dtype: Optional[torch.dtype] = None
    size: Optional[tuple[int, ...]] = None
    warmup: int
    repeats: int
    iters: int
    train_step: bool = True  # also time forward + backward + optimizer step
    dense: bool = False  # also time dense features on the full grid (forward_intermediates)
    compile: Optional[str] = None  # also time torch.compile'd models in this mode (None: eager only)


def _cases(
    execs: dict[str, Pair], patched: nn.Module, mode: str, schedules: list[Any], images: torch.Tensor, dtype: Any
) -> dict[Case, Step]:
    cases: dict[Case, Step] = {}
    for name, (base, merged) in execs.items():
        if (mode == "dense" and name != "eager") or (name == "cuda graphs" and (len(images), mode) != (1, "inference")):
            continue  # dense features run eagerly; CUDA graphs are what batch-1 inference asks for
        base.train(mode == "train")  # dense and inference: eval mode
        merged.train(mode == "train")
        cases[(name, BASELINE)] = _step(mode, base, None, images, None, dtype)
        cases |= {(name, schedule_label(r)): _step(mode, merged, patched, images, r, dtype) for r in schedules}
    return cases


def _row(
    mode: str, batch: int, key: Case, calls: dict[Case, list[float]], gflops: dict[str, float], warmup_s: float
) -> dict[str, Any]:
    """Case `key`'s row; its speedups against the unpatched model run the same way and run eagerly."""
    execution, label = key
    median = statistics.median(calls[key])
    p90 = statistics.quantiles(calls[key], n=10)[-1] if len(calls[key]) > 1 else median
    base, eager_base = (statistics.median(calls[(run, BASELINE)]) for run in (execution, "eager"))
    ideal = gflops[BASELINE] / gflops[label]
    return {
        "mode": mode,
        "execution": execution,
        "r": label,
        "batch_size": batch,
        "images_per_s": batch / median,
        "latency_ms": 1000 * median,
        "latency_p90_ms": 1000 * p90,
        "speedup": base / median,
        "speedup_vs_eager": eager_base / median,
        "gflops": gflops[label],
        "flop_speedup": ideal,
        "of_ideal": base / median / ideal,
        "warmup_s": warmup_s,
    }


def benchmark_rows(
    baseline: nn.Module, merged: nn.Module, schedules: list[Any], batch_sizes: list[int], timing: Timing
) -> list[dict[str, Any]]:
    """A row (`_row`) per mode, execution, schedule and batch size, with its peak memory and, when schedules name
    theirs, its protection mode."""
    device = timing.device
    size = timing.size or regtome.input_size(merged)
    gflops = {BASELINE: regtome.schedule_gflops(merged, 0, size)}  # the unpatched model's count
    gflops |= {label: record["gflops"] for label, record in schedule_records(merged, schedules, size).items()}
    protects = {schedule_label(r): r["protect"] for r in schedules if isinstance(r, dict) and "protect" in r}
    modes = ["inference"] + ["train"] * timing.train_step
    modes += ["dense"] * (timing.dense and hasattr(merged, "forward_intermediates"))
    # The (unpatched, patched) pair of each way of running: eager, compiled, and on CUDA also CUDA graphs
    # (reduce-overhead) for batch 1. Compiled wrappers share the modules' weights; each compiles once per
    # schedule and batch shape, at its first call.
    execs = {"eager": (baseline, merged)}
    if timing.compile is not None:
        execs["compiled"] = (compile_model(baseline, timing.compile), compile_model(merged, timing.compile))
    if timing.compile not in (None, "reduce-overhead") and device.type == "cuda":
        execs["cuda graphs"] = (compile_model(baseline, "reduce-overhead"), compile_model(merged, "reduce-overhead"))
    rows = []
    with tqdm(total=len(batch_sizes) * len(modes) * timing.repeats, desc="benchmark", dynamic_ncols=True) as bar:
        for batch in batch_sizes:
            images = torch.randn(batch, *size, device=device)
            for mode in modes:
                cases = _cases(execs, merged, mode, schedules, images, timing.dtype)
                calls, warm = timed_calls(
                    cases, device, timing.warmup, timing.repeats, timing.iters, progress=lambda: bar.update(1)
                )
                for key in calls:
                    row = _row(mode, batch, key, calls, gflops, warm[key])
                    if protects:  # modes compared (benchmark.protect): each row names its own
                        row["protect"] = protects.get(key[1])  # None for the unpatched model
                    rows.append(row | {"peak_memory_mb": peak_memory_mb(device, cases[key])})
    return rows


def speed_target(target: float, batch: int, baseline: nn.Module, merged: nn.Module, timing: Timing) -> dict[str, Any]:
    """The least merging whose measured inference speedup at `batch` reaches `target`
    (benchmark.target_speedup). Starts at the FLOP budget 1/target (no schedule reaches a speedup with fewer
    FLOPs saved, short of overheads vanishing) and lowers the budget by 0.05 until it is reached, 6 tries at most."""
    size = timing.size or regtome.input_size(merged)
    images = torch.randn(batch, *size, device=timing.device)
    tried: list[dict[str, Any]] = []
    fraction = min(1.0, 1.0 / target)
    for _ in range(6):
        try:
            r = regtome.r_for_flops(merged, fraction, size)
        except ValueError:
            break
        cases = _cases({"eager": (baseline, merged)}, merged, "inference", [r], images, timing.dtype)
        seconds = interleaved_seconds(cases, timing.device, timing.warmup, timing.repeats, timing.iters)
        label = schedule_label(r)
        speedup = seconds[("eager", BASELINE)] / seconds[("eager", label)]
        tried.append({"r": label, "flop_fraction": fraction, "speedup": speedup})
        if speedup >= target:
            return {"target_speedup": target, "batch_size": batch, "r": label, "speedup": speedup, "tried": tried}
        fraction -= 0.05
    return {"target_speedup": target, "batch_size": batch, "r": None, "tried": tried}
