"""Tiny timm ViTs shared by the tests: 32x32 images, patch 4 (64 patches), 4 blocks."""

from __future__ import annotations

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
NUM_PATCHES = 64

# name -> constructor kwargs; each is a shape of model timm ships.
VARIANTS = {
    "class": dict(),
    "class_reg4": dict(reg_tokens=4),
    "gap_reg4": dict(class_token=False, reg_tokens=4, global_pool="avg", no_embed_class=True, fc_norm=False),
    "layerscale": dict(reg_tokens=4, init_values=0.1),
    "qk_norm": dict(reg_tokens=4, qk_norm=True),
    "dynamic_size": dict(reg_tokens=4, dynamic_img_size=True),
}


def make_vit(variant: str = "class_reg4", seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    if variant == "distilled":
        return VisionTransformerDistilled(**{**TINY, **overrides}).eval()
    return VisionTransformer(**{**TINY, **VARIANTS[variant], **overrides}).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


WORKER_THREADS = torch.get_num_threads()  # this process's own: one in a pytest-xdist worker (pytest_configure)


@pytest.fixture(autouse=True)
def torch_threads_put_back():
    """A test that runs a task in this process (train.run, open_session) sets torch's threads to the cores the
    process may use (runtime.threads=null, as a user's run does): put back the worker's one thread after it, or
    every later test of the worker runs two threads per core and waits on the other worker's."""
    yield
    if torch.get_num_threads() != WORKER_THREADS:
        torch.set_num_threads(WORKER_THREADS)


def pytest_configure(config) -> None:
    """One torch thread per test worker: pytest-xdist runs one worker per core, and tiny models run slower
    when two workers each spread their small kernels over both cores."""
    import os

    global WORKER_THREADS
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    WORKER_THREADS = torch.get_num_threads()


TIE = 1e-5  # similarities closer than this may be ordered either way by another CPU's rounding


def matching_margin(model: torch.nn.Module, images: torch.Tensor) -> float:
    """The smallest gap, over every block's matching of `images` by `model`, between similarities whose order
    decides the merge: each A token's best B against its next best, and the A tokens' best similarities against
    each other (their order is the next block's A/B split). Outputs computed another way (an image alone, not in
    a batch) may differ by more than rounding only where this is below TIE."""
    import regtome.merge

    gaps = []
    original = regtome.merge.bipartite_soft_matching

    def observed(metric, r, num_protected=0, kind=None, num_registers=0):
        keys = metric[:, num_protected:].float()
        keys = keys / keys.norm(dim=-1, keepdim=True)
        scores = keys[:, ::2] @ keys[:, 1::2].transpose(-1, -2)
        if kind is not None:
            kind_left = kind[:, num_protected:]
            scores = scores.masked_fill(kind_left[:, ::2, None] != kind_left[:, None, 1::2], float("-inf"))
        top2 = scores.topk(2, dim=-1).values
        best = top2[..., 0]
        gaps.append((top2[..., 0] - top2[..., 1])[top2[..., 1].isfinite()])
        for row in best:  # per image, the finite best similarities in order
            ordered = row[row.isfinite()].sort().values
            gaps.append(ordered.diff())
        return original(metric, r, num_protected, kind=kind, num_registers=num_registers)

    regtome.merge.bipartite_soft_matching = observed
    try:
        with torch.no_grad():
            model(images)
    finally:
        regtome.merge.bipartite_soft_matching = original
    assert gaps, "no block merged"
    return min(gap.min().item() for gap in gaps if gap.numel())
