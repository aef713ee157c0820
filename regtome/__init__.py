"""RegToMe: token merging for Vision Transformers that never merges class tokens into patches, and
keeps register tokens out of patch tokens.

    import timm, regtome
    model = timm.create_model("vit_small_patch16_224", reg_tokens=4)
    regtome.patch.timm(model, r=16)

Where each concern lives: `layout` (token kinds, protection modes, the per-block prefix rule),
`schedule` (r per block and the cap), `merge` (the matching), `tokens` (what travels with the
sequence), `blocks` / `attention` / `rope` (timm's blocks with a merge inside), `forward` (the
merging loop), `pooling`, `record` (what a pass did), `checks` (option checks), `patch/` (the
patches and `options`/`last_forward`/`trace`/`remove_patch`), `prefix` (prefix-token attention
maps), `flops` / `budget` (analytic FLOPs, r from a FLOP budget).
"""
from . import patch
from .budget import r_for_flops, schedule_gflops
from .flops import vit_flops
from .layout import CLASS, DEFAULT_PROTECT, PATCH, PROTECT_MODES, REGISTER, PrefixLayout, prefix_layout
from .merge import bipartite_soft_matching, merge_source, merge_wavg
from .patch.common import last_forward, options, remove_patch, trace
from .prefix import prefix_attention
from .record import BlockTrace, ForwardRecord
from .schedule import capped_r, parse_r, r_from_config

__all__ = [
    "patch",
    "remove_patch",
    "options",
    "last_forward",
    "trace",
    "ForwardRecord",
    "BlockTrace",
    "PrefixLayout",
    "prefix_layout",
    "PROTECT_MODES",
    "DEFAULT_PROTECT",
    "PATCH",
    "REGISTER",
    "CLASS",
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
__version__ = "0.3.0"
