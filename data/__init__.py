"""Datasets and transforms for the CLI: CIFAR-10/100, ImageNet, any ImageFolder, synthetic; the images a
task looks at; the samplers and seeding that make a resumed run exact."""

from .datasets import (
    DatasetError,
    build_datasets,
    class_names,
    count_classes,
    input_transform,
    preprocessing,
    resolve_native_size,
)
from .resumable import ResumableSampler
from .seeded import EpochSeeded

__all__ = [
    "DatasetError",
    "build_datasets",
    "class_names",
    "count_classes",
    "input_transform",
    "preprocessing",
    "resolve_native_size",
    "EpochSeeded",
    "ResumableSampler",
]
