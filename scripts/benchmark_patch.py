"""Throughput of RegToMe against the unpatched timm model, side by side from one run.

    python scripts/benchmark_patch.py                      # ViT-S/16, 224, 4 registers, batch 8
    python scripts/benchmark_patch.py --device cuda --batch 64 --amp fp16

Each r schedule shares the unpatched model's weights; all cases are interleaved in one process
after warm-up. 'ideal' is the FLOP ratio (unpatched GFLOPs / merged GFLOPs); 'of ideal' is the
measured speedup divided by it.
"""
from __future__ import annotations

import argparse
import ast
import copy
import pathlib
import sys
from contextlib import nullcontext

import timm
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import regtome  # noqa: E402
from engine.timing import interleaved_seconds  # noqa: E402

AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=list(AMP), default="off")
    parser.add_argument("--r", default="[8, 13, 16, (16, -1.0)]", help="python list of schedules")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    baseline = timm.create_model(args.model, reg_tokens=args.registers).to(device).eval()
    merged = regtome.patch.timm(copy.deepcopy(baseline))
    size = baseline.patch_embed.img_size
    images = torch.randn(args.batch, 3, *size, device=device)
    schedules = ast.literal_eval(args.r)
    autocast = torch.autocast(device.type, dtype=AMP[args.amp]) if AMP[args.amp] else nullcontext()

    def run(model, r=None):
        def call():
            if r is not None:
                model.r = r
            with torch.inference_mode(), autocast:
                model(images)
        return call

    cases = {"timm": run(baseline)} | {str(r): run(merged, r) for r in schedules}
    seconds = interleaved_seconds(cases, device, repeats=args.repeats, iters=args.iters)
    gflops = {"timm": regtome.vit_flops(baseline, (3, *size))}
    for r in schedules:
        merged.r = r
        gflops[str(r)] = regtome.vit_flops(merged, (3, *size))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"{args.model} reg={args.registers} | device {name} | batch {args.batch} | amp {args.amp} | torch {torch.__version__}")
    print(f"{'r':>12} {'img/s':>9} {'GFLOPs':>7} {'speedup':>8} {'ideal':>6} {'of ideal':>8}")
    for key, sec in seconds.items():
        speedup = seconds["timm"] / sec
        ideal = gflops["timm"] / gflops[key]
        print(f"{key:>12} {args.batch / sec:9.1f} {gflops[key]:7.2f} {speedup:7.2f}x {ideal:5.2f}x {speedup / ideal:7.0%}")


if __name__ == "__main__":
    main()
