"""Write a generated image folder (train/ and val/ class folders of PNGs) for runs without a data set.

    python scripts/make_image_folder.py OUT_DIR --size 32 --per-class 500 --classes 10

Each class is a smooth random colour field plus noise, so a model can learn it; the point is to
push real files through the real loader path (decode, augment, collate, workers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write(root: Path, size: int, per_class: int, classes: int, val_per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        base = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(base).resize((size, size), Image.BICUBIC), dtype=np.float32)
        for split, count in (("train", per_class), ("val", val_per_class)):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(field + rng.normal(0, 25, field.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    write(args.out, args.size, args.per_class, args.classes, args.val_per_class)
    print(f"wrote {args.classes * (args.per_class + args.val_per_class)} images to {args.out}")


if __name__ == "__main__":
    main()
