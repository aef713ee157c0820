"""Fair timing: every case runs in the same process, interleaved, after warm-up, synchronised; and a look at
the machine first, because timings taken beside other work say little."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, Hashable, Optional, TypeVar

import torch

from ..run.runtime import available_cores, synchronize

Key = TypeVar("Key", bound=Hashable)


def seconds_of(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds of `calls` calls of `fn`, between device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def timed_calls(
    cases: dict[Key, Callable[[], object]],
    device: torch.device,
    warmup: int,
    repeats: int,
    iters: int,
    progress: Callable[[], None] = lambda: None,
) -> tuple[dict[Key, list[float]], dict[Key, float]]:
    """Seconds of every timed call of each case (`seconds_of`), and the seconds of its warm-up calls (compilation
    included). Each repeat runs every case in turn (slow drifts of clock speed or load hit all cases alike)."""
    warm = {key: seconds_of(fn, device, warmup) for key, fn in cases.items()}
    calls: dict[Key, list[float]] = {key: [] for key in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            calls[key] += [seconds_of(fn, device) for _ in range(iters)]
        progress()
    return calls, warm


def interleaved_seconds(
    cases: dict[Key, Callable[[], object]], device: torch.device, warmup: int, repeats: int, iters: int
) -> dict[Key, float]:
    """Median seconds per call of each case (`timed_calls`)."""
    calls, _ = timed_calls(cases, device, warmup, repeats, iters)
    return {key: statistics.median(values) for key, values in calls.items()}


def _cpu_seconds(pid: str) -> Optional[float]:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def busy_processes(window: float = 0.5, threshold: float = 0.2) -> list[str]:
    """Other processes that used more than `threshold` of a core during `window` seconds ('name (pid): 95%')."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    pids = [p.name for p in proc.iterdir() if p.name.isdigit() and p.name != str(os.getpid())]
    before = {pid: _cpu_seconds(pid) for pid in pids}
    time.sleep(window)
    busy = []
    for pid, start in before.items():
        end = _cpu_seconds(pid)
        if start is None or end is None or (end - start) / window < threshold:
            continue
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            name = "?"
        busy.append(f"{name} ({pid}): {100 * (end - start) / window:.0f}%")
    return busy


def machine_note() -> Optional[str]:
    """A warning when the load average (against usable cores) or other busy processes would skew timings, else None."""
    cores = available_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = busy_processes()
    if not busy and load < cores + 0.5:  # the load average counts this process too
        return None
    others = f"; busy now: {', '.join(busy[:4])}" if busy else ""
    return (
        f"timings may be unreliable: load average {load:.1f} on {cores} usable cores{others} "
        "(stop other work and run the benchmark again)"
    )
