"""This checkout's library against another release's, in one process on the same inputs: are the forward's
outputs identical under every protection mode, and is it as fast?

    git worktree add /tmp/previous COMMIT   # the release to compare with
    python scripts/compare_releases.py /tmp/previous

Each case (a timm or transformers family, a protection mode, under apart also without proportional attention
and with registers entering late, a batch size) builds one model, patches a copy with each release and
compares the outputs bit for bit; timing alternates the two releases (warm-up, then medians of
interleaved calls) on the CPU, fp32.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]


def timm_model(name: str, **overrides: object) -> Callable[[], torch.nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **overrides).eval()


def hf_dinov2_registers() -> torch.nn.Module:
    """A DINOv2-with-registers ViT-S/14 at 224 (transformers), random weights."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        image_size=224,
        patch_size=14,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        num_register_tokens=4,
    )
    return Dinov2WithRegistersModel(config).eval()


CASES = {  # family: (builder, patch function), small enough to time on a CPU
    "vit_reg4": (timm_model("vit_small_patch16_224", reg_tokens=4), "timm"),
    "dinov2_reg4": (timm_model("vit_small_patch14_reg4_dinov2", img_size=224), "timm"),
    "gap_reg4": (timm_model("vit_base_patch16_reg4_gap_256", depth=6), "timm"),
    "dinov3": (timm_model("vit_small_patch16_dinov3"), "timm"),
    "hf_dinov2_reg4": (hf_dinov2_registers, "transformers"),
}
VARIANTS = {  # options besides r and protect: the defaults, and the other branches of the forward
    "": {},
    ", no prop_attn, registers from block 3": dict(prop_attn=False, register_layer=2),
}


def outputs_of(out: object) -> list[torch.Tensor]:
    """A timm model's logits, or a transformers model's hidden states and pooled output."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in (getattr(out, "last_hidden_state", None), getattr(out, "pooler_output", None)) if t is not None]


def load_release(root: Path, alias: str) -> ModuleType:
    """The `regtome` package of `root`, imported under `alias` (its modules import each other relatively)."""
    spec = importlib.util.spec_from_file_location(
        alias, root / "regtome" / "__init__.py", submodule_search_locations=[str(root / "regtome")]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("previous", type=Path, help="a checkout of the other release")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of timing")
    parser.add_argument("--calls", type=int, default=3, help="calls per release and round")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    releases = {"this": load_release(ROOT, "regtome_this"), "previous": load_release(args.previous, "regtome_prev")}
    print(f"| family | protect | batch | identical | this ms | previous ms | this / previous |\n|{'---|' * 7}")
    for family, (build, source) in CASES.items():
        torch.manual_seed(0)
        base = build()
        for protect in ("apart", "prefix", "class"):
            for variant, options in VARIANTS.items() if protect == "apart" else [("", {})]:
                models = {}
                for label, release in releases.items():
                    patch = getattr(release.patch, source)
                    models[label] = patch(copy.deepcopy(base), r=args.r, protect=protect, **options)
                size = releases["this"].input_size(models["this"])
                for batch in args.batch:
                    images = torch.randn(batch, *size, generator=torch.Generator().manual_seed(batch))
                    outputs = {label: outputs_of(model(images)) for label, model in models.items()}
                    same = all(torch.equal(a, b) for a, b in zip(outputs["this"], outputs["previous"]))
                    times: dict[str, list[float]] = {label: [] for label in models}
                    for _ in range(args.rounds):  # alternate: each round times both, so drift hits both alike
                        for label, model in models.items():
                            times[label].append(median_ms(lambda model=model, images=images: model(images), args.calls))
                    this, previous = statistics.median(times["this"]), statistics.median(times["previous"])
                    print(
                        f"| {family} | {protect}{variant} | {batch} | {'yes' if same else 'NO'} | {this:.1f} "
                        f"| {previous:.1f} | {this / previous:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
