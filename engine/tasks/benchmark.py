"""task=benchmark: what merging buys on this machine (`engine.measure.speed`), peak memory, GFLOPs and the training
loader per worker, in benchmark.csv, benchmark.md and benchmark.png. A busy machine is said in the report, because
its figures say little."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from matplotlib.figure import Figure
from omegaconf import DictConfig, ListConfig, OmegaConf

import regtome
from data import count_classes, preprocessing

from ..errors import UserError
from ..measure.loader_timing import data_bound_notes, time_train_loader
from ..measure.speed import BASELINE, Timing, benchmark_rows, schedule_records, speed_target
from ..measure.timing import machine_note
from ..models.build import model_label
from ..models.tome_group import compact, r_option
from ..report import fit_title, save_figure, write_csv, write_lines
from ..run.checkpoint import override_keys
from ..run.results import write_results
from ..run.runtime import device_name, dtype_name
from ..run.session import open_session

log = logging.getLogger(__name__)
QUICK = {"r": [0, 16], "batch_sizes": [1, 8], "repeats": 3, "iters": 2, "warmup": 1, "dense": False}
TABLE = (
    "| mode | run | r | batch | images/s | latency ms (p90) | speedup | vs eager unpatched | GFLOPs | "
    "FLOP-ideal | of ideal | warm-up s | peak MB | data-bound |"
)


def settings(cfg: DictConfig, overrides: list[str], device: torch.device) -> DictConfig:
    """The benchmark group, with the QUICK values where benchmark.quick applies and the command line is silent."""
    bench = cfg.benchmark.copy()
    if bench.quick is True or (bench.quick == "auto" and device.type == "cpu"):
        given = set(override_keys(overrides))
        bench.merge_with({key: value for key, value in QUICK.items() if f"benchmark.{key}" not in given})
    return bench


def as_list(value: Any) -> list[Any]:
    """A config value that may be one entry or a list of them, as a list."""
    return list(OmegaConf.to_container(value, resolve=True)) if isinstance(value, ListConfig) else [value]


def benchmark_schedules(bench: DictConfig, merged: nn.Module) -> list[Any]:
    """Each benchmark.r entry, or with benchmark.protect each entry under each mode ({"r": r, "protect": mode}),
    checked against the model before anything is timed."""
    protects = as_list(bench.protect or merged.protect)  # null: the model's own mode
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


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> list[dict[str, Any]]:
    session = open_session(cfg, count_classes(cfg.dataset), distributed=False)
    merged, device, dtype = session.model, session.device, session.dtype
    bench = settings(cfg, overrides, device)
    schedules = benchmark_schedules(bench, merged)
    if busy := machine_note():
        log.warning(busy)
    baseline = regtome.remove_patch(copy.deepcopy(merged))
    size = tuple(session.inputs["input_size"])  # model.img_size (a hub model's own config may say another)
    timing = Timing(
        **OmegaConf.masked_copy(bench, ["warmup", "repeats", "iters", "train_step", "dense"]),
        compile=session.compile,
        device=device,
        dtype=dtype,
        size=size,
    )
    rows = benchmark_rows(baseline, merged, schedules, list(bench.batch_sizes), timing)
    target = None
    if bench.target_speedup is not None:
        target = speed_target(bench.target_speedup, max(bench.batch_sizes), baseline, merged, timing)
    meta = {
        "model": model_label(cfg.model),
        "registers": regtome.prefix_layout(merged).num_register,
        "protect": ",".join(as_list(bench.protect or merged.protect)),  # the modes timed
        "img_size": cfg.model.img_size,
        "device": device_name(device),
        "dtype": dtype_name(dtype),
        "compile": session.compile or "off",
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    loader = time_train_loader(cfg, session) if bench.loader else {"error": "benchmark.loader=false"}
    notes = [busy] if busy else []
    notes += [  # merging costs fixed work per block; at batch 1 that can outweigh the savings
        f"merging does not pay off at batch 1 for r={row['r']} ({row['mode']}, {row['execution']}: "
        f"{row['speedup']:.2f}x)"
        for row in rows
        if row["batch_size"] == 1 and row["r"] != BASELINE and row["flop_speedup"] > 1.0 and row["speedup"] < 1.0
    ]
    notes += data_bound_notes(loader, rows)
    if target is not None:
        tried = ", ".join(f"r={t['r']} {t['speedup']:.2f}x" for t in target["tried"])
        reached = f"reached by r={target['r']} ({target['speedup']:.2f}x)" if target["r"] else "not reached"
        notes.append(
            f"target speedup {target['target_speedup']}x at batch {target['batch_size']}: {reached} (tried {tried})"
        )
    write_outputs(rows, meta, notes, run_dir, warning=busy)
    results = {"task": "benchmark", **meta, "batch_sizes": list(bench.batch_sizes)}
    results["preprocessing"] = preprocessing(cfg.dataset, session.inputs)  # of the loader timed (the rows: random)
    results["schedules"] = schedule_records(merged, schedules, size)  # the r each row's schedule ran, per block
    results |= {"rows": rows, "loader": loader, "target_speedup": target, "notes": notes}
    write_results(run_dir, results)
    log.info("\n%s", (run_dir / "benchmark.md").read_text())
    return rows


def write_outputs(
    rows: list[dict[str, Any]], meta: dict[str, Any], notes: list[str], run_dir: Path, warning: Optional[str] = None
) -> None:
    """benchmark.csv, benchmark.md (the table, then `notes`) and benchmark.png; `warning` (a busy machine) is
    among the notes and in the figure too, which is often all that is looked at."""
    columns = list(dict.fromkeys([*(k for row in rows for k in row), *meta]))
    # a row's own protection mode wins over the run's
    write_csv(run_dir / "benchmark.csv", [meta | row for row in rows], columns)
    header = ", ".join(f"{k} {v}" for k, v in meta.items())
    lines = [f"# RegToMe benchmark\n\n{header}\n", TABLE, "|" + "---|" * TABLE.count(" | ") + "---|"]
    for row in rows:
        bound = {True: "yes", False: "no", None: ""}[row.get("data_bound")]
        lines.append(
            f"| {row['mode']} | {row['execution']} | {row['r']} | {row['batch_size']} | {row['images_per_s']:.1f} | "
            f"{row['latency_ms']:.1f} ({row['latency_p90_ms']:.1f}) | {row['speedup']:.2f}x | "
            f"{row['speedup_vs_eager']:.2f}x | {row['gflops']:.3g} | {row['flop_speedup']:.2f}x | "
            f"{row['of_ideal']:.0%} | {row['warmup_s']:.1f} | {row['peak_memory_mb']:.0f} | {bound} |"
        )
    lines += [
        "",
        "speedup: against the unpatched model run the same way (eager or compiled); vs eager unpatched: "
        "against the unpatched model run eagerly; warm-up s: the first calls, compilation included.",
        "",
    ]
    lines += [f"- {note}" for note in notes]
    write_lines(run_dir / "benchmark.md", lines)
    plot(rows, meta, run_dir / "benchmark.png", warning)


def _schedule(row: dict[str, Any]) -> str:
    """A row's r without its protection mode ('16 apart' -> '16'): the x axis when modes are compared."""
    return row["r"].removesuffix(f" {row['protect']}") if row.get("protect") else row["r"]


def plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path, warning: Optional[str] = None) -> None:
    """Speedup against r, one panel per mode, one line per way of running and batch size; the FLOP-ideal dashed."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    width = 5.5 * len(modes)  # inches: one 5.5-inch panel per mode
    fig = Figure(figsize=(width, 4.4), dpi=100)
    for ax, mode in zip(fig.subplots(1, len(modes), squeeze=False)[0], modes):
        mode_rows = [r for r in rows if r["mode"] == mode]
        protects = list(dict.fromkeys(r.get("protect") for r in mode_rows if r["r"] != "unpatched")) or [None]
        for i, protect in enumerate(protects):
            named = f" ({protect})" if len(protects) > 1 else ""
            rows_of = [r for r in mode_rows if r.get("protect") == protect or r["r"] == "unpatched"]
            ideal = {_schedule(r): r["flop_speedup"] for r in rows_of}
            ax.plot(list(ideal), list(ideal.values()), "k--" if i == 0 else "k-.", label=f"FLOP-ideal{named}")
            for execution in dict.fromkeys(r["execution"] for r in rows_of):
                for batch in sorted({r["batch_size"] for r in rows_of if r["execution"] == execution}):
                    run = [r for r in rows_of if r["execution"] == execution and r["batch_size"] == batch]
                    line = {_schedule(r): r["speedup"] for r in run}
                    style = "o-" if execution == "eager" else "s:"
                    ax.plot(list(line), list(line.values()), style, label=f"{execution}, batch {batch}{named}")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(title=mode, xlabel="r schedule", ylabel="speedup over the unpatched model")
        ax.tick_params(axis="x", labelsize=8)
        ax.legend(fontsize=7)
    title = (
        f"{meta['model']} ({meta['registers']} registers, protect={meta['protect']}) on {meta['device']}, "
        f"{meta['dtype']}, compile {meta['compile']}"
    )
    if warning:
        title += f"\nWARNING: {warning}"
    fig.suptitle(fit_title(title, width, fontsize=9), fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
