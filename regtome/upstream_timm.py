"""The private names of timm that RegToMe reads, all here: each has no public equivalent (checked with timm
1.0.31, the pinned version). `tests/test_upstream.py` fails naming the upstream name if one moves.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# forward_intermediates' rule for `indices` (an int: the last n blocks; a list: those blocks), as timm's own
# models apply it; timm.models does not export it.
from timm.models._features import feature_take_indices

__all__ = ["feature_take_indices", "position_embed"]


def position_embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own positional step on the patch embeddings: prepends the class and register tokens and
    adds the position embedding (VisionTransformer), and also returns the rotary table (Eva). timm runs it
    only inside forward_features; no public method does it alone."""
    return model._pos_embed(x)


UPSTREAM_NAMES = {  # name: what reads it
    "timm.models._features.feature_take_indices": "regtome.patch.timm (forward_intermediates)",
    "timm.models.vision_transformer.VisionTransformer._pos_embed": "regtome.patch.timm (embed)",
    "timm.models.eva.Eva._pos_embed": "regtome.patch.timm (embed)",
}
