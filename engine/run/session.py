"""The set-up every task shares: where it runs (device, precision, threads, processes) and the model.

`open_session(cfg)` is the one place that reads the `runtime` group: it joins torchrun's process
group, builds the patched model from the `model` and `tome` groups, loads weights and works out
the data config. Every task (and the scripts) start from it and read the runtime only through it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from data import input_transform, resolve_native_size

from ..models.build import build_model, data_config, is_transformers, report_capped_r
from .checkpoint import load_weights
from .compile import check_compile, compile_model, say_compiling
from .distributed import DistInfo, init_distributed
from .runtime import amp_dtype, configure_threads, loader_workers, resolve_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class Session:
    """device, dtype (None: fp32), info (ranks), model (patched, on the device; checkpoints hold its
    weights), inputs (timm's data config), prepare (what the device does to a batch first), workers
    (loader processes), eval_batch_size (every evaluation's batch), compile (the torch.compile mode of
    runtime.compile, None: eager)."""

    device: torch.device
    dtype: Optional[torch.dtype]
    info: DistInfo
    model: nn.Module
    inputs: dict[str, Any]
    prepare: nn.Module
    workers: int
    eval_batch_size: int
    compile: Optional[str] = None

    @property
    def pin_memory(self) -> bool:
        """Whether loaders pin their batches: the one rule, for every loader (pinned memory speeds up copies to
        a CUDA device only, and a CPU run on a GPU machine would pin for nothing)."""
        return self.device.type == "cuda"

    def runner(self, model: Optional[nn.Module] = None) -> nn.Module:
        """The module a loop calls: `model` (default: the session's), compiled when runtime.compile asks.
        Call it once per run: each call compiles anew."""
        model = self.model if model is None else model
        return model if self.compile is None else compile_model(model, self.compile)


def weightless(model_cfg: DictConfig) -> DictConfig:
    """A timm model group without pretrained weights: a checkpoint's weights replace them, so they are neither
    fetched nor looked for in the cache (a transformers model still reads its architecture from its config)."""
    if is_transformers(model_cfg):
        return model_cfg
    return OmegaConf.merge(model_cfg, {"pretrained": False, "pretrained_file": None})


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
    eval_batch_size = int(runtime.eval_batch_size)
    found = resolve_native_size(cfg.dataset)  # image folders: their images' size, before any work
    if found:
        log.info(found)
    workers = loader_workers(runtime.get("num_workers"))
    configure_threads(runtime.get("threads"))
    use_cuda = runtime.device != "cpu" and torch.cuda.is_available()
    info = init_distributed(use_cuda=use_cuda) if distributed else DistInfo()
    device = resolve_device(runtime.device, info.local_rank)
    dtype = amp_dtype(runtime.amp, device)
    compile_as = check_compile(runtime.get("compile"), device)  # before any work
    if compile_as is not None:
        say_compiling(compile_as, device)
    seed_everything(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model_cfg = cfg.model if weights is None else weightless(cfg.model)
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
        eval_batch_size=eval_batch_size,
        compile=compile_as,
    )
