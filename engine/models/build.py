"""The model of the `model` and `tome` config groups, patched, with its label and the data config it expects.
timm: model.name is a timm name. transformers (model.source=transformers): model.name is a hub id, loaded from the
Hugging Face cache or the hub (model.pretrained=true) or from a `save_pretrained` folder (model.pretrained_dir), with
the image processor saved beside the weights; the classifier is transformers' `...ForImageClassification` where it
has one (a new head when the number of classes differs), else the base model with a linear head (`HFClassifier`)."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import timm
import torch
import torch.nn as nn
from huggingface_hub import constants
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config

import regtome

from ..errors import UserError, first_line
from .tome_group import compact, merge_amount, r_option

log = logging.getLogger(__name__)
WEIGHTS_HINT = (
    "ckpt=PATH, model.pretrained=true, model.pretrained_file=PATH (timm) or model.pretrained_dir=DIR (transformers)"
)
PROCESSOR_FILE = "preprocessor_config.json"
UNREADABLE = (  # what to do when the config or weights are in neither the Hugging Face cache nor the hub
    "check model.name, set model.pretrained_dir=DIR (a folder written by save_pretrained), or "
    "model.pretrained=false for the preset's architecture with random weights"
)


def not_found(what: str, err: BaseException, ways_out: str) -> str:
    """One line for `what` found neither in the Hugging Face cache nor on the hub: where it was looked for, and
    `ways_out`. huggingface_hub decides where timm's and transformers' files come from; under its offline flag
    (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read as its own constant) it reads only the cache."""
    cache = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        looked = f"not in {cache}, and HF_HUB_OFFLINE is set"
    else:
        looked = f"neither in {cache} nor fetched from the hub ({first_line(err)})"
    return f"{what}: {looked}; {ways_out}, or run once where the hub is reachable (that fills the cache)"


def tome_options(tome_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The tome group as regtome.patch keyword arguments (r is 0 until tome.flops chooses it)."""
    tome = OmegaConf.to_container(tome_cfg, resolve=True) if isinstance(tome_cfg, DictConfig) else dict(tome_cfg)
    r, fraction = merge_amount(tome)
    return dict(
        r=0 if fraction is not None else r_option(r),
        prop_attn=bool(tome["prop_attn"]),
        protect=tome["protect"],
        class_layer=int(tome.get("class_layer", 0)),
        register_layer=int(tome.get("register_layer", 0)),
    )


def model_label(model_cfg: Mapping[str, Any]) -> str:
    """A name for what is built: timm's name (or 'hf-' and the hub id), then model.kwargs in their order, the
    registers, and the size when it is not the model's own: 'vit_small_patch16_224-patch4-dim192-reg4-32px'."""
    name = str(model_cfg["name"])
    kwargs = dict(model_cfg.get("kwargs") or {})
    short = {"patch_size": "patch", "embed_dim": "dim", "num_heads": "heads"}
    if is_transformers(model_cfg):  # a hub id (org/name) as the hub's cache spells it: no '/' in a folder name
        parts = ["hf-" + name.replace("/", "--")] + [f"{k}{v}" for k, v in kwargs.items()]
        return "-".join(parts + [f"{model_cfg['img_size']}px"])
    parts = [name] + [f"{short.get(k, k)}{v}" for k, v in kwargs.items()]
    if model_cfg.get("registers") is not None:
        parts.append(f"reg{model_cfg['registers']}")
    default_size = timm.get_pretrained_cfg_value(name, "input_size") if timm.is_model(name) else None
    if not default_size or int(model_cfg["img_size"]) != default_size[-1]:
        parts.append(f"{model_cfg['img_size']}px")
    return "-".join(parts)


def create_timm_model(model_cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """timm.create_model from the model group (weights from the hub or model.pretrained_file)."""
    name = model_cfg["name"]
    if not timm.is_model(name):
        if "/" in name and not name.startswith(("hf-hub:", "hf_hub:", "timm/")):
            raise UserError(
                f"model.name={name} looks like a Hugging Face hub id: set model.source=transformers "
                "(or use a model=hf_* preset); model.source=timm takes timm names such as vit_small_patch16_224"
            )
        raise UserError(
            f"unknown model {name!r}; list ViTs with: python -c \"import timm; print(timm.list_models('vit_*'))\""
        )
    kwargs: dict[str, Any] = dict(model_cfg.get("kwargs") or {})
    kwargs.update(num_classes=num_classes, img_size=model_cfg["img_size"], drop_path_rate=model_cfg["drop_path"])
    # create_model's argument for the register count: timm's Eva models (DINOv3, EVA-02) call it num_reg_tokens
    register_key = "num_reg_tokens" if timm.models.model_entrypoint(name).__module__.endswith(".eva") else "reg_tokens"
    if model_cfg.get("registers") is not None:
        kwargs[register_key] = int(model_cfg["registers"])
    if pretrained_file := model_cfg.get("pretrained_file"):
        if not os.path.isfile(pretrained_file):
            raise UserError(f"model.pretrained_file {pretrained_file} does not exist; give a .pth/.safetensors file")
        # a state dict (.pth/.safetensors), not the .npz some pretrained configs name: no custom loader
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file), custom_load=False)
    pretrained = bool(model_cfg.get("pretrained") or pretrained_file)
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except OSError as err:  # huggingface_hub's errors are OSErrors: not cached, not reachable, no such repo
        if not pretrained:
            raise
        if pretrained_file:
            raise UserError(f"cannot read model.pretrained_file {pretrained_file}: {first_line(err)}") from err
        cfg = timm.models.get_pretrained_cfg(name)
        source = str(cfg.hf_hub_id or cfg.url) if cfg else name  # its hub repository, else its URL
        ways_out = "set model.pretrained_file=PATH (.pth/.safetensors), model.pretrained=false for random weights"
        raise UserError(not_found(f"{name}'s pretrained weights ({source})", err, ways_out)) from err
    except RuntimeError as err:
        if not pretrained:  # not a weights problem: report what timm said
            raise UserError(
                f"cannot build {name} with {model_cfg.get('kwargs') or {}} ({first_line(err)}); check model.kwargs"
            ) from err
        raise UserError(
            f"pretrained weights do not fit {name} with {kwargs.get(register_key, 'its')} registers "
            f"({first_line(err)}); set model.registers=null"
        ) from err
    except TypeError as err:  # e.g. a CNN has no img_size / reg_tokens
        raise UserError(
            f"cannot apply RegToMe to {name}: building it failed ({err}); RegToMe needs a timm "
            "VisionTransformer, and model.kwargs must be arguments it takes"
        ) from err


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


def create_transformers_model(model_cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """The classifier of model.name / model.pretrained_dir with `num_classes` outputs; model.pretrained=false builds
    the preset's `model.architecture` with random weights, without the hub. model.registers and model.drop_path are
    refused: a transformers model would silently ignore them (it reads both from its own config)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

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
    source, pretrained = _source(model_cfg), _pretrained(model_cfg)
    kwargs, architecture = dict(model_cfg.get("kwargs") or {}), model_cfg.get("architecture")
    if architecture and not pretrained:  # random weights: the preset's own architecture, not the hub's config
        spec = dict(OmegaConf.to_container(architecture) if isinstance(architecture, DictConfig) else architecture)
        config = AutoConfig.for_model(spec.pop("model_type"), **spec, **kwargs)
    else:
        try:
            config = AutoConfig.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            raise UserError(not_found(source, err, UNREADABLE)) from err
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


def has_weights(model_cfg: Mapping[str, Any]) -> bool:
    """Whether the model group loads trained weights: the hub, a file (timm) or a save_pretrained folder."""
    return bool(model_cfg.get("pretrained") or model_cfg.get("pretrained_file") or model_cfg.get("pretrained_dir"))


def is_transformers(model_cfg: Mapping[str, Any]) -> bool:
    return model_cfg.get("source", "timm") == "transformers"


def build_model(
    model_cfg: Mapping[str, Any], tome_cfg: Mapping[str, Any], num_classes: int, trace_source: bool = False
) -> nn.Module:
    """The model group's model, patched with the tome group's options (tome.flops chooses r from a FLOP budget)."""
    options = tome_options(tome_cfg)  # a bad tome.r fails before anything is built
    _, fraction = merge_amount(tome_cfg)
    if is_transformers(model_cfg):
        model, patch = create_transformers_model(model_cfg, num_classes), regtome.patch.transformers
    else:
        model, patch = create_timm_model(model_cfg, num_classes), regtome.patch.timm
    try:
        patch(model, trace_source=trace_source, **options)
    except (TypeError, ValueError) as err:
        raise UserError(f"cannot apply RegToMe to {model_cfg['name']}: {err}") from err
    if fraction is not None:
        size = (3, int(model_cfg["img_size"]), int(model_cfg["img_size"]))
        try:
            r = regtome.r_for_flops(model, fraction, size)
        except ValueError as err:
            raise UserError(f"tome.flops={fraction}: {err}") from err
        patch(model, trace_source=trace_source, **(options | {"r": r}))
        reached = regtome.schedule_gflops(model, r, size) / regtome.schedule_gflops(model, 0, size)
        log.info("tome.flops=%s: r=%s (%.3f of the unmerged model's GFLOPs)", fraction, compact(r), reached)
    return model


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a timm model (a tensor), a transformers classifier (.logits) or base model (.pooler_output)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.pooler_output


def data_config(model: nn.Module, model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """timm's data config, or the mean, std and interpolation of the image processor saved with a transformers
    model's weights (ImageNet's where none was saved), at model.img_size. A model trained from scratch uses the
    data set's mean/std when it gives them."""
    size = (3, int(model_cfg["img_size"]), int(model_cfg["img_size"]))
    if not is_transformers(model_cfg):
        config = resolve_model_data_config(model) | {"input_size": size}
    else:
        mean, std, interpolation = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic"
        if _pretrained(model_cfg):  # random weights: nothing saved to read
            from transformers import AutoImageProcessor

            source = _source(model_cfg)
            try:
                processor = AutoImageProcessor.from_pretrained(source)
            except OSError as err:
                if not _has_no_processor(source):
                    what = f"{source}'s image processor ({PROCESSOR_FILE}: its mean, std and interpolation)"
                    ways_out = "set model.pretrained_dir=DIR (a folder written by save_pretrained, with the processor)"
                    raise UserError(not_found(what, err, ways_out)) from err
                log.warning("%s has no image processor (%s): using ImageNet's mean/std", source, PROCESSOR_FILE)
            else:
                resample = getattr(processor, "resample", None)
                interpolation = "bicubic" if resample is None else Image.Resampling(resample).name.lower()
                mean, std = tuple(processor.image_mean), tuple(processor.image_std)
        config = dict(
            input_size=size, mean=mean, std=std, interpolation=interpolation, crop_pct=1.0, crop_mode="center"
        )
    if not has_weights(model_cfg) and dataset_cfg.get("mean") is not None:
        config["mean"], config["std"] = tuple(dataset_cfg["mean"]), tuple(dataset_cfg["std"])
    return config


def report_capped_r(model: nn.Module, cfg: DictConfig) -> None:
    """Say once when the cap (`regtome.capped_r`) lowers the r that tome.r asked for (a FLOP budget,
    tome.flops, chose its r with the cap counted: nothing to say then)."""
    if cfg.tome.get("flops") is not None:
        return
    size = int(cfg.model.img_size)
    counts = regtome.token_counts(model, (3, size, size))
    capped = [i for i, (a, b) in enumerate(zip(counts.r_requested, counts.r)) if a != b]
    if capped:
        mode = regtome.protection(model.protect)  # what caps a block's r under it (`regtome.capped_r`), in words
        if not mode.merges_registers:
            rule = "at most half of the patch tokens"
        elif mode.kinds_apart:
            rule = "at most half of the patch and register tokens, less the registers (they merge only with each other)"
        else:
            rule = "at most half of the patch and register tokens"
        log.warning(
            f"tome.r={compact(model.r)} is beyond the cap under protect={model.protect} "
            f"({rule}) in {len(capped)} of {len(counts.r)} blocks "
            f"(first: block {capped[0] + 1} of {len(counts.r)}); applied r per block: {counts.r}"
        )
