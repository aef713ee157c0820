"""RegToMe: token merging for timm Vision Transformers that never merges class or register tokens.

    import timm, regtome
    model = timm.create_model("vit_small_patch16_224", reg_tokens=4)
    regtome.patch.timm(model, r=16)
"""
from . import patch
from .flops import vit_flops
from .merge import bipartite_soft_matching, merge_source, merge_wavg
from .patch.timm import remove_patch
from .schedule import capped_r, parse_r

__all__ = [
    "patch",
    "remove_patch",
    "parse_r",
    "capped_r",
    "bipartite_soft_matching",
    "merge_wavg",
    "merge_source",
    "vit_flops",
]
__version__ = "0.1.0"
