"""Build a RegToMe ViT from the `model` and `tome` config groups, and the data config it expects."""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import timm
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf, open_dict
from timm.data import resolve_model_data_config

import regtome

from .checkpoint import check_same_architecture, load_checkpoint
from .errors import UserError
from .overrides import apply_overrides, overrides_group


def schedule_from_config(r: Any) -> Any:
    """An r from a config as regtome takes it: Hydra has no tuples, so a pair [r, x.y] becomes (r, x.y)."""
    if isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], float):
        return (r[0], r[1])
    return list(r) if isinstance(r, (list, tuple)) else r


def tome_options(tome_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The tome group as regtome.patch.timm keyword arguments."""
    return dict(r=schedule_from_config(tome_cfg["r"]), prop_attn=bool(tome_cfg["prop_attn"]),
                protect=tome_cfg["protect"])


def r_per_block(model: nn.Module) -> list[int]:
    return regtome.parse_r(len(model.blocks), model.r)


def build_model(model_cfg: Mapping[str, Any], tome_cfg: Mapping[str, Any], num_classes: int,
                trace_source: bool = False) -> nn.Module:
    name = model_cfg["name"]
    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r}; list ViTs with: python -c \"import timm; print(timm.list_models('vit_*'))\"")
    kwargs: dict[str, Any] = dict(model_cfg.get("kwargs") or {})
    kwargs.update(num_classes=num_classes, img_size=model_cfg["img_size"], drop_path_rate=model_cfg["drop_path"])
    if model_cfg.get("registers") is not None:
        kwargs["reg_tokens"] = int(model_cfg["registers"])
    pretrained_file = model_cfg.get("pretrained_file")
    if pretrained_file:
        if not os.path.isfile(pretrained_file):
            raise UserError(f"model.pretrained_file {pretrained_file} does not exist; give a .pth/.safetensors file")
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file))
    pretrained = bool(model_cfg.get("pretrained") or pretrained_file)
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, ConnectionError) as err:
        raise UserError(f"could not fetch pretrained weights for {name} ({str(err).splitlines()[0][:200]}); "
                        "without network, set model.pretrained_file=PATH") from err
    except RuntimeError as err:  # state-dict mismatch, e.g. registers the weights do not have
        raise UserError(f"pretrained weights do not fit {name} with {kwargs.get('reg_tokens', 'its')} registers "
                        f"({str(err).splitlines()[0][:200]}); set model.registers=null") from err
    except TypeError as err:  # e.g. a CNN has no img_size / reg_tokens
        raise UserError(f"cannot apply RegToMe to {name}: building it failed ({err}); RegToMe needs a timm "
                        "VisionTransformer, and model.kwargs must be arguments it takes") from err
    try:
        return regtome.patch.timm(model, trace_source=trace_source, class_layer=int(model_cfg["class_layer"]),
                                  register_layer=int(model_cfg["register_layer"]), **tome_options(tome_cfg))
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot apply RegToMe to {name}: {err}") from err


def data_config(model: nn.Module, model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """timm's data config (mean/std, interpolation, crop) at model.img_size.

    Pretrained models always use their own normalisation; a model trained from scratch uses the
    data set's mean/std when the data set gives them.
    """
    config = resolve_model_data_config(model)
    config["input_size"] = (3, int(model_cfg["img_size"]), int(model_cfg["img_size"]))
    pretrained = bool(model_cfg.get("pretrained") or model_cfg.get("pretrained_file"))
    if not pretrained and dataset_cfg.get("mean") is not None:
        config["mean"], config["std"] = tuple(dataset_cfg["mean"]), tuple(dataset_cfg["std"])
    return config


def config_from_checkpoint(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Optional[dict[str, torch.Tensor]]]:
    """With ckpt=PATH: take model, dataset and tome from the checkpoint's saved config (keys set on
    this command line win) and return its weights (the EMA weights when it has them)."""
    if not cfg.ckpt:
        return cfg, None
    checkpoint = load_checkpoint(cfg.ckpt)
    saved = OmegaConf.create(checkpoint["config"])
    effective = apply_overrides(saved, cfg, overrides, groups=("model", "dataset", "tome"))
    if overrides_group(overrides, "model"):
        check_same_architecture(saved.model, effective.model, cfg.ckpt)
    with open_dict(cfg):  # the saved groups replace the composed ones whole
        cfg.model, cfg.dataset, cfg.tome = effective.model, effective.dataset, effective.tome
    return cfg, checkpoint["ema"] if checkpoint.get("ema") is not None else checkpoint["model"]
