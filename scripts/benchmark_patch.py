"""Throughput and latency of RegToMe against the unpatched timm model, eager and compiled, from one run.

    python scripts/benchmark_patch.py --registers 4        # ViT-S/16, 224, 4 registers, batch 8
    python scripts/benchmark_patch.py --registers 4 --batch 1 --r "[16]" --compile default   # + compiled rows
    python scripts/benchmark_patch.py --registers 4 --batch 8 --r "[16]" --train --compile default
    python scripts/benchmark_patch.py --registers 4 --device cuda --batch 64 --amp fp16
    python scripts/benchmark_patch.py --model vit_small_patch16_dinov3   # its own 4 storage tokens
    python scripts/benchmark_patch.py --registers 4 --r "[16]" --protect apart,prefix   # the cost of a mode
    python scripts/benchmark_patch.py --source transformers --model facebook/dinov2-with-registers-small
        (--model: a hub id or a save_pretrained folder; --random: its config with random weights)

Each r schedule shares the unpatched model's weights; all cases are interleaved in one process
after warm-up (the same measurement as `task=benchmark`: `engine.measure.speed`). 'speedup' is against
the unpatched model run the same way (eager or compiled), 'vs eager' against the eager unpatched model;
'ideal' is the FLOP ratio (unpatched GFLOPs / merged GFLOPs); 'of ideal' is the speedup divided by it;
latency is the median (and 90th percentile) of single calls; warm-up includes compilation.
"""

from __future__ import annotations

import argparse
import ast
import copy
import sys
from pathlib import Path

import timm
import torch

import regtome

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # engine/, data/: beside scripts/, not installed
from engine.measure.speed import Timing, benchmark_rows
from engine.models.build import register_argument
from engine.run.compile import why_not_compile
from engine.run.runtime import AMP_DTYPES, configure_threads, device_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--source", choices=["timm", "transformers"], default="timm")
    parser.add_argument("--random", action="store_true", help="transformers: the config only, random weights")
    parser.add_argument("--img-size", type=int, default=224, help="transformers: input size")
    parser.add_argument("--registers", type=int, default=None, help="register tokens (default: the model's own)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="off")
    parser.add_argument("--r", default="[8, 13, 16, (16, -1.0)]", help="python list of schedules")
    parser.add_argument(
        "--protect",
        default=regtome.DEFAULT_PROTECT,
        help=f"comma-separated protection modes, each timed (default {regtome.DEFAULT_PROTECT})",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument(
        "--compile",
        default=None,
        help="also time torch.compile'd models in this mode "
        "(default, reduce-overhead, max-autotune; CUDA adds reduce-overhead rows at batch 1)",
    )
    parser.add_argument("--train", action="store_true", help="also time the training step (forward, backward, AdamW)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the usable cores)")
    args = parser.parse_args()

    device = torch.device(args.device)
    configure_threads(args.threads)
    if args.compile:
        reason = why_not_compile(device)
        if reason:
            sys.exit(f"error: --compile: {reason}")
    if args.source == "transformers":
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(args.model)
        config.image_size = args.img_size
        baseline = (
            AutoModel.from_config(config) if args.random else AutoModel.from_pretrained(args.model, config=config)
        )
        patch = regtome.patch.transformers
    else:
        kwargs = {} if args.registers is None else {register_argument(args.model): args.registers}
        baseline, patch = timm.create_model(args.model, **kwargs), regtome.patch.timm
    baseline = baseline.to(device).eval()
    merged = patch(copy.deepcopy(baseline))
    protects = args.protect.split(",")
    schedules = [
        r if protects == [merged.protect] else {"r": r, "protect": protect}
        for r in ast.literal_eval(args.r)
        for protect in protects
    ]
    timing = Timing(warmup=2, repeats=args.repeats, iters=args.iters, train_step=args.train, compile=args.compile)
    rows = benchmark_rows(baseline, merged, schedules, [args.batch], timing, device, AMP_DTYPES[args.amp])

    name = device_name(device)
    registers = regtome.prefix_layout(merged).num_register
    print(
        f"{args.model} reg={registers} | device {name} | batch {args.batch} | amp {args.amp} "
        f"| torch {torch.__version__}"
    )
    print(
        f"{'mode':>9} {'run':>11} {'r':>14} {'img/s':>8} {'ms':>7} {'p90 ms':>7} {'GFLOPs':>6} {'speedup':>8} "
        f"{'vs eager':>8} {'ideal':>6} {'of ideal':>8} {'warm-up s':>9}"
    )
    for row in rows:
        print(
            f"{row['mode']:>9} {row['execution']:>11} {row['r']:>14} {row['images_per_s']:8.1f} "
            f"{row['latency_ms']:7.1f} {row['latency_p90_ms']:7.1f} {row['gflops']:6.2f} {row['speedup']:7.2f}x "
            f"{row['speedup_vs_eager']:7.2f}x {row['flop_speedup']:5.2f}x {row['of_ideal']:7.0%} {row['warmup_s']:9.1f}"
        )


if __name__ == "__main__":
    main()
