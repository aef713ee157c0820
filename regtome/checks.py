"""The option checks' earlier home: they are `regtome.patch_options` now (kept so old imports still work)."""

from .patch_options import OPTIONS, check_options, model_options

__all__ = ["OPTIONS", "check_options", "model_options"]
