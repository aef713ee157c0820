"""Datasets and transforms for the CLI: CIFAR-10/100, ImageNet, any ImageFolder, synthetic."""
from .datasets import DatasetError, build_datasets, class_names, count_classes, input_transform
from .seeded import EpochSeeded

__all__ = ["DatasetError", "build_datasets", "class_names", "count_classes", "input_transform", "EpochSeeded"]
