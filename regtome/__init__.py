"""RegToMe: token merging for Vision Transformers that never merges class tokens into patches, and
keeps register tokens out of patch tokens.

    import timm, regtome
    model = timm.create_model("vit_small_patch16_224", reg_tokens=4)
    regtome.patch.timm(model, r=16)

Where each concern lives: `kinds` and `layout` (token kinds, the prefix, the per-block prefix rule),
`protection` (what each protection mode means), `patch_options` (the patch options: names, defaults, checks),
`schedule` (r per block and the cap), `merge` (the matching), `tokens` (what travels with the sequence),
`blocks` / `hf_blocks` / `attention` / `rope` (the blocks with a merge inside), `forward` (the merging
loop), `pooling`, `record` (what a pass did), `parts` (what RegToMe reads of a model, patched or not),
`flops` / `budget` (analytic FLOPs, r from a FLOP budget), and `patch/` on top of them (`base`: the
patched-model contract; `timm`, `hf`: the two sources; `api`: options, last_forward, trace, dense features;
`prefix`: prefix-token attention maps). Nothing outside `patch/` imports it.
"""

from . import patch
from .budget import r_for_flops, schedule_gflops
from .flops import TokenCounts, token_counts, vit_flops
from .kinds import CLASS, PATCH, REGISTER
from .layout import PrefixLayout
from .merge import bipartite_soft_matching, capped_r, merge_source, merge_wavg
from .parts import input_size, is_patched, patch_grid, prefix_layout
from .patch.api import dense_features, forward_with_token_map, last_forward, options, trace
from .patch.base import remove_patch
from .patch.prefix import prefix_attention, prefix_attention_support
from .protection import DEFAULT_PROTECT, PROTECT_MODES, Protection, protection
from .record import BlockTrace, ForwardRecord
from .schedule import parse_r, r_from_config
from .tokens import slot_owner

__all__ = [
    "patch",
    "remove_patch",
    "is_patched",
    "options",
    "last_forward",
    "trace",
    "dense_features",
    "forward_with_token_map",
    "input_size",
    "patch_grid",
    "ForwardRecord",
    "BlockTrace",
    "PrefixLayout",
    "prefix_layout",
    "PROTECT_MODES",
    "DEFAULT_PROTECT",
    "Protection",
    "protection",
    "PATCH",
    "REGISTER",
    "CLASS",
    "prefix_attention",
    "prefix_attention_support",
    "parse_r",
    "r_from_config",
    "capped_r",
    "bipartite_soft_matching",
    "merge_wavg",
    "merge_source",
    "slot_owner",
    "vit_flops",
    "token_counts",
    "TokenCounts",
    "r_for_flops",
    "schedule_gflops",
]
__version__ = "0.5.0"
