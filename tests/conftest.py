"""Tiny timm ViTs shared by the tests: 32x32 images, patch 4 (64 patches), 4 blocks."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
NUM_PATCHES = 64

# name -> constructor kwargs; each is a shape of model timm ships.
VARIANTS = {
    "class": dict(),
    "class_reg4": dict(reg_tokens=4),
    "gap_reg4": dict(class_token=False, reg_tokens=4, global_pool="avg", no_embed_class=True, fc_norm=False),
    "layerscale": dict(reg_tokens=4, init_values=0.1),
    "qk_norm": dict(reg_tokens=4, qk_norm=True),
    "dynamic_size": dict(reg_tokens=4, dynamic_img_size=True),
}


def make_vit(variant: str = "class_reg4", seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    if variant == "distilled":
        return VisionTransformerDistilled(**{**TINY, **overrides}).eval()
    return VisionTransformer(**{**TINY, **VARIANTS[variant], **overrides}).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def pytest_configure(config) -> None:
    """One torch thread per test worker: pytest-xdist runs one worker per core, and tiny models run slower
    when two workers each spread their small kernels over both cores."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
