"""runtime.compile: torch.compile for train, eval and benchmark, checked before any work.

The patched forward traces as one graph with no break, but for the parallel-scaling and differential blocks,
whose keys a forward hook reads: 4 and 5 breaks per block (docs/library.md). Each r schedule is a guard of the
compiled code: a new schedule compiles once more (a sweep job's model compiles once, at its first batch).
Checkpoints always hold the plain module's weights (no `_orig_mod.` prefix): the session keeps the
plain model and hands the compiled one only to the loops that call it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any, Optional

from ..errors import UserError

if TYPE_CHECKING:  # torch loads only after the command line passed (the checks of `compile_mode` run before)
    import torch
    import torch.nn as nn

log = logging.getLogger(__name__)
RECOMPILE_LIMIT = 64  # schedules x batch shapes x train/eval of one run; torch's default (8) falls back to eager


def compile_mode(value: Any) -> Optional[str]:
    """runtime.compile as a torch.compile mode; None for eager (false, null). The schema took nothing else."""
    if value is None or value is False:
        return None
    return "default" if value is True else str(value)


def why_not_compile(device: torch.device) -> Optional[str]:
    """What keeps this machine from compiling for `device` (None when nothing does)."""
    import torch

    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (it needs torch 2.1 or newer)"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton, which is not installed"
    if device.type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(name and shutil.which(name) for name in compilers):
            return "torch.compile on the CPU needs a C++ compiler (g++ or clang++; none found on PATH)"
    return None


def check_compile(value: Any, device: torch.device) -> Optional[str]:
    """The mode runtime.compile asks for, after checking that this machine can compile (one-line UserError)."""
    mode = compile_mode(value)
    if mode is not None:
        reason = why_not_compile(device)
        if reason is not None:
            raise UserError(f"runtime.compile={value}: {reason}; set runtime.compile=false to run eagerly")
    return mode


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile(model) with static shapes (each batch size compiles its own kernels)."""
    import torch

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    return torch.compile(model, mode=mode, dynamic=False)


def say_compiling(mode: str, device: torch.device) -> None:
    log.info(
        "runtime.compile=%s: the first batch compiles the model (%s); each new r schedule or batch shape "
        "compiles once more",
        mode,
        "minutes on a CPU" if device.type == "cpu" else "a minute or so",
    )
