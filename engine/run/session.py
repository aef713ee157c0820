"""The set-up every task shares: `open_session(cfg)`, the one reader of the `runtime` group, joins torchrun's
process group and builds the patched model from the `model` and `tome` groups, with its weights.

runtime.compile: the patched forward traces as one graph, but for the parallel-scaling and differential blocks
(4 and 5 breaks per block, docs/library.md); each new r schedule compiles once more. The session keeps the plain
model, so checkpoints never hold `_orig_mod.` keys; only the loops get the compiled one (`Session.runner`)."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from data import input_transform, resolve_native_size
from data.workers import ignore_interrupts

from ..errors import UserError
from ..models.build import build_model, data_config, is_transformers, report_capped_r
from .checkpoint import load_weights
from .runtime import (
    DistInfo,
    amp_dtype,
    available_cores,
    init_distributed,
    loader_workers,
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)
RECOMPILE_LIMIT = 64  # schedules x batch shapes x train/eval of one run; torch's default (8) falls back to eager


@dataclass(kw_only=True)
class Session:
    """Where a task runs and its model (patched, on the device): dtype None is fp32, inputs timm's data config,
    prepare what the device does to a batch first, compile runtime.compile's torch.compile mode (None: eager)."""

    device: torch.device
    dtype: Optional[torch.dtype]
    info: DistInfo
    model: nn.Module
    inputs: dict[str, Any]
    prepare: nn.Module
    workers: int
    eval_batch_size: int
    compile: Optional[str] = None

    def loader(self, dataset: Dataset, **options: Any) -> DataLoader:
        """Every loader of the run: the session's workers, which leave Ctrl-C to the main process; batches pinned
        only for a CUDA device (a CPU run on a GPU machine gains nothing)."""
        return DataLoader(
            dataset,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_interrupts,
            **options,
        )

    def runner(self, model: Optional[nn.Module] = None) -> nn.Module:
        """The module a loop calls: `model` (default: the session's), compiled when runtime.compile asks.
        Call it once per run: each call compiles anew."""
        model = self.model if model is None else model
        return model if self.compile is None else compile_model(model, self.compile)


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """torch.compile(model) with static shapes (each batch size compiles its own kernels)."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    return torch.compile(model, mode=mode, dynamic=False)


def check_compile(value: Any, device: torch.device) -> Optional[str]:
    """runtime.compile as a torch.compile mode (None: eager), after checking that this machine can compile."""
    if value is None or value is False:
        return None
    mode = "default" if value is True else str(value)
    reason, compilers = None, (os.environ.get("CXX"), "g++", "c++", "clang++")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        reason = "torch.compile on CUDA needs triton, which is not installed"
    if device.type == "cpu" and not any(name and shutil.which(name) for name in compilers):
        reason = "torch.compile on the CPU needs a C++ compiler (g++ or clang++; none found on PATH)"
    if reason is not None:
        raise UserError(f"runtime.compile={value}: {reason}; set runtime.compile=false to run eagerly")
    log.info(
        "runtime.compile=%s: the first batch compiles the model (%s); each new r schedule or batch shape "
        "compiles once more",
        mode,
        "minutes on a CPU" if device.type == "cpu" else "a minute or so",
    )
    return mode


def open_session(
    cfg: DictConfig,
    num_classes: int,
    weights: Optional[Mapping[str, torch.Tensor]] = None,
    weights_path: Any = None,
    trace_source: bool = False,
    distributed: bool = True,
) -> Session:
    """Device, threads and workers from `runtime`, the model from `model` + `tome` with `weights`."""
    runtime = cfg.runtime
    if found := resolve_native_size(cfg.dataset):  # image folders: their images' size, before any work
        log.info(found)
    workers = loader_workers(runtime.get("num_workers"))
    # torch's CPU threads: runtime.threads, else the cores this process may use (torch's default, the machine's
    # cores, oversubscribes a process pinned to fewer: taskset, SLURM, a container)
    threads = runtime.threads if runtime.get("threads") is not None else available_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    use_cuda = runtime.device != "cpu" and torch.cuda.is_available()
    info = init_distributed(use_cuda=use_cuda) if distributed else DistInfo()
    device = resolve_device(runtime.device, info.local_rank)
    dtype = amp_dtype(runtime.amp, device)
    compile_as = check_compile(runtime.get("compile"), device)  # before any work
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model_cfg = cfg.model
    # `weights` replace timm's pretrained ones: neither fetched nor looked for (transformers reads its config)
    if weights is not None and not is_transformers(cfg.model):
        model_cfg = OmegaConf.merge(cfg.model, {"pretrained": False, "pretrained_file": None})
    model = build_model(model_cfg, cfg.tome, num_classes, trace_source=trace_source)
    seed_everything(cfg.seed + info.rank)  # every later draw (drop path, dropout, mixup) its own per rank
    if weights is not None:
        load_weights(model, weights, weights_path)
    model.to(device)
    report_capped_r(model, cfg)
    inputs = data_config(model, cfg.model, cfg.dataset)
    prepare = input_transform(cfg.dataset, inputs)
    prepare = prepare.to(device) if prepare is not None else nn.Identity()
    return Session(
        device=device,
        dtype=dtype,
        info=info,
        model=model,
        inputs=inputs,
        prepare=prepare,
        workers=workers,
        eval_batch_size=int(runtime.eval_batch_size),
        compile=compile_as,
    )
