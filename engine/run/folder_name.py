"""A run directory name that is unique per run and shared by the ranks of one torchrun job."""

from __future__ import annotations

import functools
import os
import time


def _start_time(pid: int) -> float | None:
    """When process `pid` started (Linux /proc), or None where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@functools.lru_cache(maxsize=1)
def run_id() -> str:
    """'YYYY-mm-dd_HH-MM-SS_PID', or the SLURM job id.

    - REGTOME_RUN_ID wins when set (a multirun sets it, so the jobs it submits share its sweep dir).
    - Under SLURM: 'slurm-JOBID', the same for every task of the job and after a requeue, so a
      requeued job finds its own checkpoints/last.pt.
    - Under torchrun every rank is a child of one agent: all ranks name the agent's pid and start time.
    - Otherwise the process's own pid keeps two runs started in the same second apart.
    """
    if os.environ.get("REGTOME_RUN_ID"):
        return os.environ["REGTOME_RUN_ID"]
    slurm_job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    if slurm_job:
        return f"slurm-{slurm_job}"
    if "LOCAL_RANK" in os.environ:
        pid = os.getppid()
        started = _start_time(pid) or time.time()
    else:
        pid, started = os.getpid(), time.time()
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started)) + f"_{pid}"
