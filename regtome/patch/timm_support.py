"""What `regtome.patch.timm` supports in timm, and why the rest is refused (a TypeError that says why)."""

from __future__ import annotations

import torch.nn as nn
from timm.layers import Attention, AttentionPoolLatent, AttentionRope
from timm.layers.diff_attention import DiffAttention
from timm.models.eva import Eva, EvaAttention

from ..blocks import BLOCK_FORWARDS, block_attentions
from ..parts import TIMM_MODELS

SUPPORTED_MODELS = TIMM_MODELS  # the classes `regtome.parts` reads unpatched are the ones that patch
SELF_ATTENTIONS = (Attention, DiffAttention, EvaAttention, AttentionRope)


def check_model(model: nn.Module) -> None:
    """Refuse, naming why, every model whose forward RegToMe could not reproduce exactly at r=0."""
    if not isinstance(model, SUPPORTED_MODELS):
        reason = {
            "VisionTransformerRelPos": ": its relative-position bias table is indexed by grid position, "
            "which merged tokens no longer have"
        }.get(type(model).__name__, "")
        raise TypeError(
            f"regtome.patch.timm needs a timm VisionTransformer or Eva (or subclass), "
            f"got {type(model).__name__}{reason}"
        )
    for i, block in enumerate(model.blocks):
        if type(block) not in BLOCK_FORWARDS:
            raise TypeError(
                f"block {i} is a {type(block).__name__}; RegToMe supports "
                f"{', '.join(sorted(c.__name__ for c in BLOCK_FORWARDS))}"
            )
        for attn in block_attentions(block):
            if attn is not block and type(attn) not in SELF_ATTENTIONS:
                raise TypeError(
                    f"block {i} uses {type(attn).__name__}; RegToMe supports "
                    f"{', '.join(c.__name__ for c in SELF_ATTENTIONS)}"
                )
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None and type(attn_pool) is not AttentionPoolLatent:
        raise TypeError(
            f"global_pool={model.global_pool!r} uses {type(attn_pool).__name__}, which cannot weigh "
            "merged tokens; RegToMe supports AttentionPoolLatent ('map'), 'token', 'avg', 'avgmax', 'max'"
        )
    if isinstance(model, Eva) and model.patch_drop is not None:
        raise TypeError(
            "patch dropout (patch_drop_rate > 0) on an Eva model gives each image its own rotary "
            "table, which RegToMe does not follow; build the model with patch_drop_rate=0"
        )
