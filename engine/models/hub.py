"""Pretrained weights and image processors from the Hugging Face hub or its cache: what a user reads when a
file is in neither.

huggingface_hub decides where a file comes from (timm and transformers both ask it): its cache
($HF_HOME/hub, filled once on a machine with network) or the hub. Under its offline flag (HF_HUB_OFFLINE=1,
or TRANSFORMERS_OFFLINE=1, read here as huggingface_hub reads them: its own constant) it reads the cache and
never touches the network, so compute nodes without network load what a login node cached.
"""

from __future__ import annotations

from huggingface_hub import constants

from ..errors import first_line


def offline() -> bool:
    """Whether huggingface_hub runs offline (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set)."""
    return bool(constants.HF_HUB_OFFLINE)


def not_found(what: str, err: BaseException, ways_out: str) -> str:
    """One line for `what` (e.g. "vit_tiny_patch16_224's pretrained weights (timm/...)") found neither in the
    cache nor on the hub: where it was looked for, and `ways_out` plus caching it where the hub is reachable."""
    cache = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if offline():
        looked = f"not in {cache}, and HF_HUB_OFFLINE is set"
    else:
        looked = f"neither in {cache} nor fetched from the hub ({first_line(err)})"
    return f"{what}: {looked}; {ways_out}, or run once where the hub is reachable (that fills the cache)"
