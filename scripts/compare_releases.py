"""This checkout's library against another release's, in one process on the same inputs: are the forward's
outputs identical under every protection mode, and is it as fast?

    git worktree add /tmp/previous v0.4.0   # or any commit
    python scripts/compare_releases.py /tmp/previous

Each case (a timm family, a protection mode, a batch size) builds one model, patches a copy with each release
and compares the logits bit for bit; timing alternates the two releases (warm-up, then medians of
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

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # family: (timm name, overrides that keep it small enough to time on a CPU)
    "vit_reg4": ("vit_small_patch16_224", dict(reg_tokens=4)),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=224)),
    "gap_reg4": ("vit_base_patch16_reg4_gap_256", dict(depth=6)),
    "dinov3": ("vit_small_patch16_dinov3", dict()),
}


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
    for family, (name, overrides) in CASES.items():
        torch.manual_seed(0)
        base = timm.create_model(name, pretrained=False, num_classes=10, **overrides).eval()
        size = base.patch_embed.img_size
        for protect in ("apart", "prefix", "class"):
            models = {}
            for label, release in releases.items():
                models[label] = release.patch.timm(copy.deepcopy(base), r=args.r, protect=protect)
            for batch in args.batch:
                images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
                outputs = {label: model(images) for label, model in models.items()}
                same = torch.equal(outputs["this"], outputs["previous"])
                times: dict[str, list[float]] = {label: [] for label in models}
                for _ in range(args.rounds):  # alternate: each round times both, so drift hits both alike
                    for label, model in models.items():
                        times[label].append(median_ms(lambda model=model, images=images: model(images), args.calls))
                this, previous = statistics.median(times["this"]), statistics.median(times["previous"])
                print(
                    f"| {family} | {protect} | {batch} | {'yes' if same else 'NO'} | {this:.1f} | {previous:.1f} "
                    f"| {this / previous:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
