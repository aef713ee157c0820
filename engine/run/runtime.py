"""Device, threads, loader workers, mixed precision, seeds and the random states a resumed run must restore, and
torchrun (and SLURM through submitit): the process group, reductions across ranks."""

from __future__ import annotations

import logging
import os
import random
import warnings
from contextlib import nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}
MAX_DEFAULT_WORKERS = 4
log = logging.getLogger(__name__)
_said: set[str] = set()  # warnings given once per process


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """runtime.device as a torch device. auto without a GPU runs on the CPU and says so once per run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device=cuda but no CUDA GPU is visible; use runtime.device=auto or cpu")
    if name == "auto" and not torch.cuda.is_available():
        if "no_cuda" not in _said:
            _said.add("no_cuda")
            log.warning(
                "no CUDA GPU found: running on the CPU (slow), in fp32 unless runtime.amp asks for bf16 "
                "(runtime.device=cpu says it and silences this)"
            )
        return torch.device("cpu")
    return torch.device("cuda", local_rank) if name != "cpu" else torch.device("cpu")


def available_cores(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers, SLURM)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with suppress(OSError, ValueError):
        quota, period = (Path(cgroup_root) / "cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    return max(1, cores)


def loader_workers(num_workers: Optional[int]) -> int:
    """runtime.num_workers, or by default the cores this process may use (at most 4)."""
    cores = available_cores()
    if num_workers is None:
        return min(MAX_DEFAULT_WORKERS, cores)
    if num_workers > cores and "workers" not in _said:
        _said.add("workers")
        log.warning(
            f"runtime.num_workers={num_workers} but this process may use {cores} core{'s' * (cores != 1)}: the "
            f"workers will wait on each other (runtime.num_workers=null starts {min(MAX_DEFAULT_WORKERS, cores)})"
        )
    return num_workers


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for runtime.amp (None: fp32); auto takes fp16 on a GPU without bf16 (e.g. V100)."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type == "cpu":
        warnings.warn(
            "runtime.amp=fp16 on the CPU is much slower than fp32 (about 13x measured); use runtime.amp=off or bf16",
            stacklevel=2,
        )
    return AMP_DTYPES[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def dtype_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, in types that load with torch.load(weights_only=True)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state(
        ("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def synchronize(device: torch.device) -> None:
    """Wait for the GPU, so wall-clock timings measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launch_rank() -> int:
    """This process's rank as its launcher set it, before any process group exists: torchrun's RANK, or a
    multi-task SLURM job's SLURM_PROCID (the submitit launcher exports RANK only when the group is joined);
    0 for one process. The one rule for who owns the run folder."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def init_distributed(use_cuda: bool) -> DistInfo:
    """Join the process group torchrun describes in the environment (a multi-task SLURM job through submitit:
    its variables, from SLURM's); a no-op for one process."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        with suppress(ImportError):
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """`value` of every rank, in rank order, on every rank ([value] for one process)."""
    if not info.enabled:
        return [value]
    values: list[Any] = [None] * info.world_size
    dist.all_gather_object(values, value)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
