"""How fast the configured training data pipeline is, per loader worker (task=benchmark): the train loader's work
(read, decode, augment, collate) timed in this process, as one worker does it; W workers deliver at most W times
that."""

from __future__ import annotations

import itertools
import time
from functools import partial
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from data import DatasetError, EpochSeeded, build_datasets, input_transform

from ..run.session import Session
from .timing import seconds_of


def _images_per_s(dataset: Dataset, batch_size: int, batches: int, seed: int) -> tuple[float, int]:
    """Samples/s of an in-process loader over shuffled batches (one warm-up batch), and bytes per sample."""
    generator = torch.Generator().manual_seed(seed)
    iterator = iter(DataLoader(EpochSeeded(dataset, seed), batch_size, shuffle=True, generator=generator))
    images, _ = next(iterator)
    bytes_per_sample = images[0].numel() * images.element_size()
    start = time.perf_counter()
    seen = sum(len(images) for images, _ in itertools.islice(iterator, batches))
    return seen / max(time.perf_counter() - start, 1e-9), bytes_per_sample


def time_train_loader(cfg: DictConfig, session: Session, batches: int = 8) -> dict[str, Any]:
    """images_per_s_per_worker of the train pipeline; with small images resized on the device, also the
    CPU-resize chain it replaces and the device's cost of the resize."""
    tc, device, workers, inputs = cfg.trainer, session.device, session.workers, session.inputs
    build = partial(build_datasets, cfg.dataset, inputs, augment=tc.augment, splits=("train",), seed=cfg.seed)
    try:
        train = build()["train"]
        rate, sample_bytes = _images_per_s(train, tc.batch_size, batches, cfg.seed)
    except DatasetError as err:
        return {"error": str(err)}
    out: dict[str, Any] = {
        "dataset": cfg.dataset.name,
        "batch_size": tc.batch_size,
        "num_workers": workers,
        "images_per_s_per_worker": rate,
        "bytes_per_sample": sample_bytes,
        "images_per_s": rate * max(workers, 1),
        "resized_on_device": False,
    }
    prepare = input_transform(cfg.dataset, inputs)
    if prepare is not None:
        cpu_rate, cpu_bytes = _images_per_s(build(on_device=False)["train"], tc.batch_size, batches, cfg.seed)
        images = torch.stack([train[i % len(train)][0] for i in range(tc.batch_size)]).to(device)
        resize = partial(prepare.to(device), images)
        resize()  # a warm-up, then the device's cost of 5 resizes
        out |= {
            "resized_on_device": True,
            "cpu_resize_images_per_s_per_worker": cpu_rate,
            "cpu_resize_bytes_per_sample": cpu_bytes,
            "loader_speedup_from_device_resize": rate / cpu_rate,
            "device_resize_images_per_s": 5 * tc.batch_size / max(seconds_of(resize, device, calls=5), 1e-9),
        }
    return out


def data_bound_notes(loader: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """Say whether the training steps measured would wait for data with runtime.num_workers workers."""
    if "error" in loader:
        return [f"loader not timed: {loader['error']}"]
    supply = loader["images_per_s"]  # per worker, times max(runtime.num_workers, 1)
    notes = [
        f"train loader: {loader['images_per_s_per_worker']:.0f} images/s per worker "
        f"({loader['bytes_per_sample'] / 1024:.1f} KB a sample), {supply:.0f} images/s with "
        f"runtime.num_workers={loader['num_workers']}"
    ]
    if loader["resized_on_device"]:
        notes.append(
            f"small images resized on the device: the loader is {loader['loader_speedup_from_device_resize']:.1f}x "
            f"faster per worker than resizing on the CPU ({loader['cpu_resize_images_per_s_per_worker']:.0f} "
            f"images/s, {loader['cpu_resize_bytes_per_sample'] / 1024:.0f} KB a sample); the device resizes "
            f"{loader['device_resize_images_per_s']:.0f} images/s"
        )
    for row in rows:
        if row["mode"] == "train":
            row["data_bound"] = supply < row["images_per_s"]
            if row["data_bound"]:
                notes.append(
                    f"data-bound: training r={row['r']} at batch {row['batch_size']} takes "
                    f"{row['images_per_s']:.0f} images/s but {loader['num_workers']} workers supply "
                    f"{supply:.0f}; add workers (runtime.num_workers)"
                )
    return notes
