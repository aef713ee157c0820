"""Datasets and transforms for the CLI: CIFAR-10/100, ImageNet, any ImageFolder, synthetic."""
from .datasets import DatasetError, build_datasets

__all__ = ["DatasetError", "build_datasets"]
