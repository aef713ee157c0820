"""Split a folder of class folders into train/ and val/ (symlinks; nothing is copied).

    python scripts/split_image_folder.py SOURCE DIR --val-per-class 500

SOURCE holds one folder of images per class (SOURCE/<class>/*.jpg); DIR gets train/<class>/ and
val/<class>/, what dataset=imagefolder dataset.root=DIR reads.

The last `--val-per-class` files of each class (in sorted order) go to val/, the rest to train/:
the same split every time, so a held-out set stays held out across runs and sessions.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS  # the suffixes dataset=imagefolder reads


def split(source: Path, out: Path, val_per_class: int) -> tuple[int, int]:
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{source} holds no class folders")
    counts = [0, 0]
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if len(files) <= val_per_class:
            raise ValueError(f"{folder} has {len(files)} images, not more than --val-per-class {val_per_class}")
        for part, chosen in (("train", files[:-val_per_class]), ("val", files[-val_per_class:])):
            target = out / part / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for file in chosen:
                link = target / file.name
                if not link.exists():
                    os.symlink(file.resolve(), link)
            counts[part == "val"] += len(chosen)
    return counts[0], counts[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--val-per-class", type=int, default=500)
    args = parser.parse_args()
    try:
        train, val = split(args.source, args.out, args.val_per_class)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.out}: {train} train and {val} val images")


if __name__ == "__main__":
    main()
