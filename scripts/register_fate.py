"""Where do registers go when they may merge? Per block: alone, merged with registers, merged into patches.

    python scripts/register_fate.py CKPT --root DATA_DIR --r "[8,-1.0]" --samples 1000 --out DIR
    python scripts/register_fate.py CKPT --protect apart      # registers merge only with registers

Writes register_fate.json and register_fate.png into --out (default: the checkpoint's run folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # engine/, data/: beside scripts/, not installed
from data import DatasetError, build_datasets
from engine.errors import UserError
from engine.models.build import model_label
from engine.report.register_fate import plot_fates, register_fates
from engine.run.checkpoint import read_checkpoint
from engine.run.results import merge_record, r_that_ran
from engine.run.session import open_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--root", default=None, help="dataset.root (default: the checkpoint's)")
    parser.add_argument("--r", default="8", help="the schedule, as tome.r is written (e.g. 8 or [8,-1.0])")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--protect", choices=["class", "apart"], default="class")
    parser.add_argument("--device", default="auto", help="runtime.device: auto, cuda or cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    try:
        saved = read_checkpoint(args.ckpt)
        cfg = saved.config
        if args.root:
            cfg.dataset.root = args.root
        # --r replaces how the run merged: a FLOP budget it was trained with (tome.flops) no longer chooses r
        cfg.tome.r, cfg.tome.flops, cfg.tome.protect = yaml.safe_load(args.r), None, args.protect
        cfg.runtime.device = args.device
        session = open_session(
            cfg, int(cfg.dataset.num_classes), saved.weights, args.ckpt, trace_source=True, distributed=False
        )
        dataset = build_datasets(cfg.dataset, session.inputs, augment=False, splits=("val",), seed=0)["val"]
    except (UserError, DatasetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    subset = Subset(dataset, range(min(args.samples, len(dataset))))
    summary = register_fates(
        session.model, DataLoader(subset, batch_size=100), session.device, session.prepare, args.protect
    )
    merge = merge_record(session.model, session.inputs["input_size"])  # the r that ran, as every task records it
    summary |= {"checkpoint": str(args.ckpt), "model": model_label(cfg.model), **merge}
    out = args.out or args.ckpt.parent.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "register_fate.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_fates(
        summary,
        str(out / "register_fate.png"),
        f"registers under protect={args.protect}, r={r_that_ran(merge)}, {summary['images']} held-out images",
    )
    for fate, values in summary["fractions_per_block"].items():
        print(f"{fate:>15}: " + " ".join(f"{100 * v:5.1f}%" for v in values))
    print(f"mean cosine similarity between registers (last block, unmerged): {summary['register_cosine_unmerged']:.3f}")
    print(f"wrote {out / 'register_fate.json'} and register_fate.png")


if __name__ == "__main__":
    main()
