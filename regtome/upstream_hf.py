"""The private names of Hugging Face transformers that RegToMe reads, all here: each has no public
equivalent (checked with transformers 5.24.0, the pinned version). `tests/test_upstream.py` fails naming the
upstream name if one moves.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch.nn as nn


def attn_implementation(config: Any) -> str:
    """The attention implementation a model runs ('eager', 'sdpa', ...): transformers' own modeling files
    read `config._attn_implementation`; the public `attn_implementation=` argument only sets it."""
    return config._attn_implementation


def eager_attention(attn: nn.Module) -> Callable[..., Any]:
    """The eager attention function of the modeling file that defines `attn` (each family has its own
    `eager_attention_forward`, module-level, not exported)."""
    return sys.modules[type(attn).__module__].eager_attention_forward


UPSTREAM_NAMES = {  # name: what reads it
    "PretrainedConfig._attn_implementation": "regtome.patch.hf (check_model), regtome.hf_blocks (hf_attention)",
    "<modeling file>.eager_attention_forward": "regtome.hf_blocks (hf_attention)",
}
