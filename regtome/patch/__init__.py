"""Patches that add RegToMe to model libraries: `regtome.patch.timm(model, r=16)`."""
from .timm import timm

__all__ = ["timm"]
