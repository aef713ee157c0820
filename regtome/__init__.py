"""RegToMe: token merging for timm Vision Transformers that never merges class or register tokens.

    import timm, regtome
    model = timm.create_model("vit_small_patch16_224", reg_tokens=4)
    regtome.patch.timm(model, r=16)
"""
from . import patch
from .prefix import prefix_attention
from .budget import r_for_flops, schedule_gflops
from .flops import vit_flops
from .merge import bipartite_soft_matching, merge_source, merge_wavg
from .patch.timm import PROTECT_MODES, ForwardRecord, PrefixLayout, last_forward, options, prefix_layout, remove_patch
from .schedule import capped_r, parse_r, r_from_config

__all__ = [
    "patch",
    "remove_patch",
    "options",
    "last_forward",
    "ForwardRecord",
    "PrefixLayout",
    "prefix_layout",
    "PROTECT_MODES",
    "prefix_attention",
    "parse_r",
    "r_from_config",
    "capped_r",
    "bipartite_soft_matching",
    "merge_wavg",
    "merge_source",
    "vit_flops",
    "r_for_flops",
    "schedule_gflops",
]
__version__ = "0.2.0"
