"""Which timm ViTs RegToMe patches: every `vit_*`, `deit*` and `eva*` config, built small, checked.

    python scripts/zoo_coverage.py [--out zoo_coverage.csv] [--names PATTERN ...]

Each config is built with random weights at depth 2 and 64 px (56 px for patch 14), then:
- `exact`: the patched model at r=0 gives timm's output (max abs difference <= 1e-5);
- `merges`: at r=4 it removes tokens, the output is finite, the prefix tokens keep their slots
  with size 1 (protect="prefix");
- `refused`: regtome.patch.timm raised a TypeError/ValueError naming why (the reason is kept).
Configs that do not build at that size, or build as another class than VisionTransformer or Eva,
are listed but not counted. No network: no weights are loaded.
"""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from typing import Optional

import timm
import torch
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

import regtome

PATTERNS = ("vit_*", "deit*", "eva*")


def build_small(name: str) -> torch.nn.Module:
    size = 56 if "patch14" in name else 64
    return timm.create_model(name, pretrained=False, depth=2, img_size=size, num_classes=10).eval()


def check(name: str, r: int = 4, seed: int = 0) -> dict[str, object]:
    """One row of the coverage table for timm config `name`."""
    row: dict[str, object] = {
        "name": name,
        "class": "",
        "counted": False,
        "status": "",
        "max_diff": "",
        "tokens": "",
        "reason": "",
    }
    torch.manual_seed(seed)
    try:
        model = build_small(name)
    except Exception as err:  # timm's own assertions at this size; not RegToMe's concern
        row.update(status="does not build", reason=f"{type(err).__name__}: {str(err)[:120]}")
        return row
    row.update({"class": type(model).__name__, "counted": isinstance(model, (VisionTransformer, Eva))})
    size = model.patch_embed.img_size
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = model(images)
        try:
            regtome.patch.timm(model, r=0, trace_source=True)
        except (TypeError, ValueError) as err:
            row.update(status="refused", reason=str(err))
            return row
        difference = (model(images) - reference).abs().max().item()
        with regtome.options(model, r=r):
            merged = model(images)
    record = regtome.last_forward(model)
    prefix = record.layout.num_prefix
    expected_prefix = torch.eye(record.source.shape[-1])[:prefix]
    prefix_kept = torch.equal(record.source[:, :prefix], expected_prefix.expand(2, -1, -1)) and bool(
        (record.size[:, :prefix] == 1).all()
    )
    grid = record.source.shape[-1]
    merges = record.tokens[-1] < grid and bool(torch.isfinite(merged).all()) and prefix_kept
    row.update(max_diff=f"{difference:.1e}", tokens="->".join(str(t) for t in (grid, *record.tokens)))
    if difference > 1e-5:
        row.update(status="differs at r=0")
    elif not merges:
        row.update(status="does not merge")
    else:
        row.update(status="exact and merges")
    return row


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="zoo_coverage.csv")
    parser.add_argument("--names", nargs="*", default=list(PATTERNS), help="timm.list_models patterns")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    names = sorted({n for pattern in args.names for n in timm.list_models(pattern)})
    rows = [check(name) for name in tqdm(names, desc="configs")]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    counted = [r for r in rows if r["counted"]]
    good = sum(r["status"] == "exact and merges" for r in counted)
    print(
        f"{len(rows)} configs; {len(counted)} build as VisionTransformer or Eva: {good} exact and merging "
        f"({100 * good / max(1, len(counted)):.1f}%), "
        f"{sum(r['status'] == 'refused' for r in counted)} refused, "
        f"{sum(r['status'] in ('differs at r=0', 'does not merge') for r in counted)} wrong; table: {args.out}"
    )
    for r in rows:
        if r["status"] not in ("exact and merges", "does not build"):
            print(f"  {r['name']} ({r['class']}): {r['status']} {r['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
