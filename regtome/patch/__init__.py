"""Patches that add RegToMe to model libraries: `regtome.patch.timm(model, r=16)`,
`regtome.patch.transformers(model, r=16)` (Hugging Face; imported on first use). Both give a model
that keeps the one contract of `regtome.patch.base.PatchedModel`."""

from typing import Any

from .timm import timm


def transformers(model: Any, **options: Any) -> Any:
    """Patch a Hugging Face transformers vision model in place (see `regtome.patch.hf.transformers`)."""
    from .hf import transformers as patch_transformers

    return patch_transformers(model, **options)


__all__ = ["timm", "transformers"]
