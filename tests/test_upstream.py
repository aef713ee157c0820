"""The private names of timm and transformers that RegToMe reads (regtome/upstream_timm.py, upstream_hf.py)
are still where it reads them: a new upstream release that moves one fails here, naming it."""

from __future__ import annotations

import importlib
import sys

import pytest

from regtome import upstream_hf, upstream_timm
from regtome.hf_blocks import LAYERS


def resolve(dotted: str) -> object:
    """`package.module.Class.attribute` -> the object (the longest importable module prefix, then attributes)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("name", list(upstream_timm.UPSTREAM_NAMES))
def test_timms_private_names_are_still_there(name):
    try:
        resolve(name)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"timm moved {name} (read by {upstream_timm.UPSTREAM_NAMES[name]}): {err}")


def test_transformers_private_names_are_still_there():
    from transformers import PretrainedConfig

    assert hasattr(PretrainedConfig(), "_attn_implementation"), (
        "transformers moved PretrainedConfig._attn_implementation "
        f"(read by {upstream_hf.UPSTREAM_NAMES['PretrainedConfig._attn_implementation']})"
    )
    for layer in LAYERS:
        module = sys.modules[layer.__module__]
        assert callable(getattr(module, "eager_attention_forward", None)), (
            f"transformers moved {module.__name__}.eager_attention_forward "
            f"(read by {upstream_hf.UPSTREAM_NAMES['<modeling file>.eager_attention_forward']})"
        )
