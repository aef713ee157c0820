"""Hugging Face transformers models (model.source=transformers): model.name is a hub id, loaded from the Hugging
Face cache or the hub (model.pretrained=true) or from a `save_pretrained` folder (model.pretrained_dir), with
the image processor saved beside the weights. The classifier is transformers' `...ForImageClassification` where
it has one (a new head when the number of classes differs), else the base model with a linear head (`HFClassifier`)."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from huggingface_hub import constants
from omegaconf import DictConfig, OmegaConf

from ..errors import UserError
from .build import not_found

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PROCESSOR_FILE = "preprocessor_config.json"
UNREADABLE = (  # what to do when the config or weights are in neither the Hugging Face cache nor the hub
    "check model.name, set model.pretrained_dir=DIR (a folder written by save_pretrained), or "
    "model.pretrained=false for the preset's architecture with random weights"
)


class HFClassifier(nn.Module):
    """A transformers base model (`backbone`) with a linear head on its pooler output (e.g. DINOv3)."""

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


def _pretrained(model_cfg: Mapping[str, Any]) -> bool:
    return bool(model_cfg.get("pretrained") or model_cfg.get("pretrained_dir"))


def check_model_group(model_cfg: Mapping[str, Any]) -> None:
    """A timm name is named as such first; then model.registers and model.drop_path, timm's settings that a
    transformers model would silently ignore (it reads both from its own config), are refused."""
    import timm

    name = str(model_cfg["name"])
    if "/" not in name and timm.is_model(name):
        raise UserError(
            f"model.name={name} is a timm model: set model.source=timm (model.source=transformers takes "
            "a Hugging Face hub id such as facebook/dinov2-with-registers-small, or a model=hf_* preset)"
        )
    given = [f"model.registers={model_cfg.get('registers')}"] if model_cfg.get("registers") is not None else []
    given += [f"model.drop_path={model_cfg.get('drop_path')}"] if model_cfg.get("drop_path") else []
    if given:
        raise UserError(
            f"{' and '.join(given)}: a transformers model does not read them (its register tokens and stochastic "
            "depth are its config's: model.kwargs, e.g. model.kwargs.drop_path_rate=0.1); set model.registers=null "
            "model.drop_path=0, as the model=hf_* presets do"
        )


def _config(model_cfg: Mapping[str, Any], source: str) -> Any:
    """The transformers config: the preset's own architecture for random weights, else the hub's or the folder's."""
    from transformers import AutoConfig

    kwargs = dict(model_cfg.get("kwargs") or {})
    architecture = model_cfg.get("architecture")
    if architecture and not _pretrained(model_cfg):
        spec = dict(OmegaConf.to_container(architecture) if isinstance(architecture, DictConfig) else architecture)
        return AutoConfig.for_model(spec.pop("model_type"), **spec, **kwargs)
    try:
        return AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(not_found(source, err, UNREADABLE)) from err


def create_transformers_model(model_cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The classifier of model.name / model.pretrained_dir with `num_classes` outputs, in the attention
    implementation model.attn_implementation (sdpa by default); model.pretrained=false builds the preset's
    `model.architecture` with random weights, without the hub."""
    from transformers import AutoModel, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    check_model_group(model_cfg)
    source, pretrained = _source(model_cfg), _pretrained(model_cfg)
    config = _config(model_cfg, source)
    config.num_labels = num_classes
    if not pretrained:  # random weights: built at the configured input size
        getattr(config, "vision_config", config).image_size = int(model_cfg["img_size"])
    implementation = model_cfg.get("attn_implementation") or "sdpa"
    classification = type(config) in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING
    auto = AutoModelForImageClassification if classification else AutoModel
    try:
        if pretrained:
            model = auto.from_pretrained(
                source, config=config, attn_implementation=implementation, ignore_mismatched_sizes=True
            )
        else:
            model = auto.from_config(config, attn_implementation=implementation)
    except (OSError, ValueError) as err:
        raise UserError(not_found(source, err, UNREADABLE)) from err
    return model if classification else HFClassifier(model, num_classes)


def transformers_data_config(model_cfg: Mapping[str, Any], img_size: int) -> dict[str, Any]:
    """mean, std and interpolation of the model's image processor; ImageNet's statistics for random weights or
    a model saved without a processor (the log says which)."""
    processor = _image_processor(model_cfg)
    mean, std, interpolation = IMAGENET_MEAN, IMAGENET_STD, "bicubic"
    if processor is not None:
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        resample = getattr(processor, "resample", None)
        if resample is not None:
            from PIL import Image

            interpolation = Image.Resampling(resample).name.lower()
    return {
        "input_size": (3, img_size, img_size),
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }


def _image_processor(model_cfg: Mapping[str, Any]) -> Optional[Any]:
    """The image processor saved with the model's weights; None (said in the log) when the model has none. One
    that exists but cannot be read here (not cached on an offline node) is one line, not ImageNet's statistics."""
    if not _pretrained(model_cfg):
        return None  # random weights: nothing saved to read
    from transformers import AutoImageProcessor

    source = _source(model_cfg)
    try:
        return AutoImageProcessor.from_pretrained(source)
    except OSError as err:
        if not _has_no_processor(source):
            what = f"{source}'s image processor ({PROCESSOR_FILE}: its mean, std and interpolation)"
            ways_out = "set model.pretrained_dir=DIR (a folder written by save_pretrained, with the processor)"
            raise UserError(not_found(what, err, ways_out)) from err
    log.warning("%s has no image processor (%s): using ImageNet's mean/std", source, PROCESSOR_FILE)
    return None


def _has_no_processor(source: str) -> bool:
    """Whether `source` (a folder, or a hub id) is known to hold no processor: not in the folder, recorded as
    absent in the Hugging Face cache, or, where the hub is reachable, not on the hub."""
    if os.path.isdir(source):
        return not os.path.isfile(os.path.join(source, PROCESSOR_FILE))
    from huggingface_hub import file_exists, try_to_load_from_cache

    cached = try_to_load_from_cache(source, PROCESSOR_FILE)  # a path, None (not cached), or a "known absent" mark
    if cached is not None and not isinstance(cached, str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        return not file_exists(source, PROCESSOR_FILE)
    except OSError:  # the hub did not answer: unknown
        return False
