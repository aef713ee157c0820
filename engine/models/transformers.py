"""Hugging Face transformers models for the CLI (model.source=transformers).

model.name is a hub id (facebook/dinov2-with-registers-small) and model.pretrained=true loads it from
the hub; model.pretrained_dir=DIR loads a folder written by `save_pretrained` (machines without
internet). The CLI trains and evaluates classifiers: transformers' own `...ForImageClassification`
where it has one (a new head when the number of classes differs), else the base model with a linear
head on its pooler output (`HFClassifier`, e.g. DINOv3).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..errors import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class HFClassifier(nn.Module):
    """A transformers base model (`backbone`) with a linear head on its pooler output."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(backbone.config.hidden_size, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(pixel_values).pooler_output)


def _source(model_cfg: Mapping[str, Any]) -> str:
    folder = model_cfg.get("pretrained_dir")
    if folder and not os.path.isdir(str(folder)):
        raise UserError(f"model.pretrained_dir {folder} does not exist; give a folder written by save_pretrained")
    return str(folder) if folder else str(model_cfg["name"])


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def create_transformers_model(model_cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The classifier of model.name / model.pretrained_dir with `num_classes` outputs, in the attention
    implementation model.attn_implementation (sdpa by default)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    source = _source(model_cfg)
    pretrained = bool(model_cfg.get("pretrained") or model_cfg.get("pretrained_dir"))
    try:
        config = AutoConfig.from_pretrained(source, **dict(model_cfg.get("kwargs") or {}))
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot read the transformers config of {source} ({_first_line(err)}); without network, "
            "set model.pretrained_dir=DIR (a folder written by save_pretrained)"
        ) from err
    config.num_labels = num_classes
    if not pretrained:  # random weights: built at the configured input size
        vision = getattr(config, "vision_config", config)
        vision.image_size = int(model_cfg["img_size"])
    implementation = model_cfg.get("attn_implementation") or "sdpa"
    config._attn_implementation = implementation
    classification = type(config) in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
    auto = AutoModelForImageClassification if classification else AutoModel
    try:
        if pretrained:
            model = auto.from_pretrained(source, config=config, ignore_mismatched_sizes=True)
        else:
            model = auto.from_config(config)
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load {source} ({_first_line(err)}); without network, set model.pretrained_dir=DIR"
        ) from err
    if hasattr(config, "vision_config"):  # SigLIP: the attention implementation of the vision tower
        model.config.vision_config._attn_implementation = implementation
    return model if classification else HFClassifier(model, num_classes)


def transformers_data_config(model_cfg: Mapping[str, Any], img_size: int) -> dict[str, Any]:
    """mean/std of the model's image processor when it can be read (hub or pretrained_dir), else ImageNet's."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    try:
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(_source(model_cfg))
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except Exception:  # no processor saved, no network: ImageNet's statistics
        pass
    return {
        "input_size": (3, img_size, img_size),
        "mean": mean,
        "std": std,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
