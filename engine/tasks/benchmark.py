"""task=benchmark: what merging buys on this machine: images/s and latency (inference, training step, dense
features), eager and compiled, peak memory, GFLOPs, the training loader per worker (`engine.measure.speed`).
On a CPU, `benchmark.quick` sizes the defaults to finish in minutes (keys on the command line win). A busy
machine is said in the report, because its figures say little."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

import regtome
from data import count_classes, preprocessing

from ..errors import UserError
from ..measure.loader_timing import data_bound_notes, time_train_loader
from ..measure.speed import BASELINE, Timing, benchmark_rows, inference_step, schedule_label, schedule_records
from ..measure.timing import interleaved_seconds, machine_note
from ..models.build import model_label
from ..models.tome_group import compact, r_option
from ..report.benchmark_report import write_outputs
from ..run.checkpoint import override_keys
from ..run.results import write_results
from ..run.runtime import device_name, dtype_name
from ..run.session import open_session

log = logging.getLogger(__name__)
QUICK = {"r": [0, 16], "batch_sizes": [1, 8], "repeats": 3, "iters": 2, "warmup": 1, "dense": False}


def settings(cfg: DictConfig, overrides: list[str], device: torch.device) -> DictConfig:
    """The benchmark group, with the QUICK values where benchmark.quick applies and the command line is silent."""
    bench = cfg.benchmark.copy()
    quick = bench.get("quick", "auto")
    if quick is True or (quick == "auto" and device.type == "cpu"):
        given = set(override_keys(overrides))
        for key, value in QUICK.items():
            if f"benchmark.{key}" not in given:
                bench[key] = value
    return bench


def as_list(value: Any) -> list[Any]:
    """A config value that may be one entry or a list of them, as a list."""
    value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return list(value) if isinstance(value, (list, tuple)) else [value]


def protect_modes(bench: DictConfig, merged: nn.Module) -> list[str]:
    """benchmark.protect (a mode or a list of them, checked by the schema) as a list; null: the model's own."""
    return as_list(bench.get("protect") or merged.protect)


def benchmark_schedules(bench: DictConfig, merged: nn.Module) -> list[Any]:
    """Each benchmark.r entry, or with benchmark.protect each entry under each mode ({"r": r, "protect": mode}),
    checked against the model before anything is timed."""
    protects = protect_modes(bench, merged)
    schedules = []
    for entry in as_list(bench.r):
        name = f"benchmark.r entry {compact(entry)}"
        r = r_option(entry, name)
        try:
            for mode in protects:
                with regtome.options(merged, r=r, protect=mode):
                    pass  # checks r against the model under each mode: fail before timing anything
        except ValueError as err:
            raise UserError(f"{name}: {err}") from err
        schedules += [r] if protects == [merged.protect] else [{"r": r, "protect": mode} for mode in protects]
    return schedules


def speed_target(
    bench: DictConfig,
    baseline: nn.Module,
    merged: nn.Module,
    timing: Timing,
    device: torch.device,
    dtype: Any,
    size: tuple[int, ...],
) -> Optional[dict[str, Any]]:
    """benchmark.target_speedup (None when not asked): the least merging whose measured inference speedup at the
    largest batch reaches it. Starts at the FLOP budget 1/target (no schedule reaches a speedup with fewer FLOPs
    saved, short of overheads vanishing) and lowers the budget by 0.05 until it is reached, 6 tries at most."""
    if bench.target_speedup is None:
        return None
    target, batch = float(bench.target_speedup), max(bench.batch_sizes)
    images = torch.randn(batch, *size, device=device)
    baseline.eval()
    merged.eval()
    tried: list[dict[str, Any]] = []
    fraction = min(1.0, 1.0 / target)
    for _ in range(6):
        try:
            r = regtome.r_for_flops(merged, fraction, size)
        except ValueError:
            break
        cases = {
            BASELINE: inference_step(baseline, None, images, None, device, dtype),
            "merged": inference_step(merged, merged, images, r, device, dtype),
        }
        seconds = interleaved_seconds(cases, device, warmup=timing.warmup, repeats=timing.repeats, iters=timing.iters)
        speedup = seconds[BASELINE] / seconds["merged"]
        tried.append({"r": schedule_label(r), "flop_fraction": fraction, "speedup": speedup})
        if speedup >= target:
            reached = {"r": schedule_label(r), "speedup": speedup}
            return {"target_speedup": target, "batch_size": batch, **reached, "tried": tried}
        fraction -= 0.05
    return {"target_speedup": target, "batch_size": batch, "r": None, "tried": tried}


def batch_one_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Merging costs fixed work per block; at batch 1 that can outweigh the savings."""
    return [
        f"merging does not pay off at batch 1 for r={row['r']} ({row['mode']}, {row['execution']}: "
        f"{row['speedup']:.2f}x)"
        for row in rows
        if row["batch_size"] == 1 and row["r"] != BASELINE and row["flop_speedup"] > 1.0 and row["speedup"] < 1.0
    ]


def target_notes(target: Optional[dict[str, Any]]) -> list[str]:
    if target is None:
        return []
    tried = ", ".join(f"r={t['r']} {t['speedup']:.2f}x" for t in target["tried"])
    reached = f"reached by r={target['r']} ({target['speedup']:.2f}x)" if target["r"] else "not reached"
    return [f"target speedup {target['target_speedup']}x at batch {target['batch_size']}: {reached} (tried {tried})"]


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> list[dict[str, Any]]:
    session = open_session(cfg, count_classes(cfg.dataset), distributed=False)
    merged, device, dtype = session.model, session.device, session.dtype
    bench = settings(cfg, overrides, device)
    schedules = benchmark_schedules(bench, merged)
    busy = machine_note()
    if busy:
        log.warning(busy)
    baseline = regtome.remove_patch(copy.deepcopy(merged))
    timing = Timing(
        warmup=bench.warmup,
        repeats=bench.repeats,
        iters=bench.iters,
        train_step=bench.train_step,
        dense=bench.dense,
        compile=session.compile,
    )
    size = tuple(session.inputs["input_size"])  # model.img_size (a hub model's own config may say another)
    rows = benchmark_rows(baseline, merged, schedules, list(bench.batch_sizes), timing, device, dtype, size)
    target = speed_target(bench, baseline, merged, timing, device, dtype, size)
    meta = {
        "model": model_label(cfg.model),
        "registers": regtome.prefix_layout(merged).num_register,
        "protect": ",".join(protect_modes(bench, merged)),  # the modes timed
        "img_size": cfg.model.img_size,
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "compile": session.compile or "off",
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    loader = time_train_loader(cfg, session) if bench.loader else {"error": "benchmark.loader=false"}
    notes = ([busy] if busy else []) + batch_one_notes(rows) + data_bound_notes(loader, rows) + target_notes(target)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(rows, meta, notes, run_dir, warning=busy)
    results = {"task": "benchmark", **meta, "batch_sizes": list(bench.batch_sizes)}
    results["preprocessing"] = preprocessing(cfg.dataset, session.inputs)  # of the loader timed (the rows: random)
    results["schedules"] = schedule_records(merged, schedules, size)  # the r each row's schedule ran, per block
    results |= {"rows": rows, "loader": loader, "target_speedup": target, "notes": notes}
    write_results(run_dir, results)
    log.info("\n%s", (run_dir / "benchmark.md").read_text())
    return rows
