"""The library's speed in one command: RegToMe against the unpatched model, random weights and input, as flags.

    python scripts/benchmark_patch.py --registers 4        # ViT-S/16, 224, 4 registers, batch 8
    python scripts/benchmark_patch.py --registers 4 --batch 1 --r "[16]" --compile default   # + compiled rows
    python scripts/benchmark_patch.py --registers 4 --batch 8 --r "[16]" --train --compile default
    python scripts/benchmark_patch.py --registers 4 --device cuda --batch 64 --amp fp16
    python scripts/benchmark_patch.py --model vit_small_patch16_dinov3   # its own 4 storage tokens
    python scripts/benchmark_patch.py --registers 4 --r "[16]" --protect apart,prefix   # the cost of a mode
    python scripts/benchmark_patch.py --source transformers --model facebook/dinov2-with-registers-small
        (--model: a hub id or a save_pretrained folder; --random: its config with random weights)

A thin entry: the flags become `python main.py task=benchmark ...` overrides (printed first) and that
command runs, so the measurement, the table (benchmark.md, printed at the end), benchmark.csv/.png and
results.json are task=benchmark's (`engine.measure.speed`). Keys after the flags go to it as they are.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def config_r(r: Any) -> Any:
    """A Python r as the config writes it: a tuple is ToMe's (r, inflection) pair, (16, -1) -> [16, -1.0]; a
    two-entry per-block list ending in 0 or 1 gets a trailing 0 ([16, 1] -> [16, 1, 0], the same schedule) so
    that the config cannot read it as a pair."""
    if isinstance(r, tuple):
        return [r[0], float(r[1])]
    return r + [0] if isinstance(r, list) and len(r) == 2 and r[1] in (0, 1) else r


def quoted(value: str) -> str:
    """A string value for Hydra, quoted where it must be: a path with ',', '=' or '(' stays one value."""
    if re.fullmatch(r"[\w./:+-]+", value):
        return value
    return "'" + value.replace("'", "\\'") + "'"


def native_size(name: str) -> int:
    """A timm model's own input size (224 where timm has none registered, e.g. an hf-hub: name)."""
    import timm

    try:
        return int(timm.get_pretrained_cfg_value(name, "input_size")[-1])
    except (RuntimeError, TypeError, KeyError):
        return 224


def overrides(args: argparse.Namespace) -> list[str]:
    """The task=benchmark command line these flags mean."""
    schedules = json.dumps([config_r(r) for r in ast.literal_eval(args.r)]).replace(" ", "")
    out = ["task=benchmark", "dataset=synthetic", "tome.r=0", f"benchmark.r={schedules}"]
    out += [f"benchmark.batch_sizes=[{args.batch}]", f"benchmark.repeats={args.repeats}"]
    out += [f"benchmark.iters={args.iters}", "benchmark.warmup=2", f"benchmark.train_step={str(args.train).lower()}"]
    out += ["benchmark.dense=false", "benchmark.loader=false", "benchmark.quick=false"]
    out += [f"benchmark.protect=[{args.protect}]"] if args.protect else []
    out += [f"runtime.device={args.device}", f"runtime.amp={args.amp}", f"runtime.compile={args.compile or 'false'}"]
    out += [f"runtime.threads={args.threads if args.threads is not None else 'null'}", "model.drop_path=0.0"]
    out += [f"model.name={quoted(args.model)}"]
    out += [f"model.registers={args.registers if args.registers is not None else 'null'}"]
    if args.source == "transformers":
        folder = os.path.isdir(args.model) and not args.random
        out += ["model.source=transformers", f"model.img_size={args.img_size or 224}"]
        out += [f"model.pretrained={str(not args.random and not folder).lower()}"]
        out += [f"model.pretrained_dir={quoted(args.model)}"] if folder else []
    else:
        out += ["model.source=timm", f"model.img_size={args.img_size or native_size(args.model)}"]
        out += ["model.pretrained=false"]
    return out + args.extra


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--source", choices=["timm", "transformers"], default="timm")
    parser.add_argument("--random", action="store_true", help="transformers: the config only, random weights")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: the model's own; 224)")
    parser.add_argument("--registers", type=int, default=None, help="register tokens (default: the model's own)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--amp", default="off", help="off, bf16, fp16 or auto (runtime.amp)")
    parser.add_argument("--r", default="[8, 13, 16, (16, -1.0)]", help="python list of schedules")
    parser.add_argument(
        "--protect", default=None, help="comma-separated protection modes, each timed (default: tome.protect's)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--compile", default=None, help="also time torch.compile'd models in this mode")
    parser.add_argument("--train", action="store_true", help="also time the training step (forward, backward, AdamW)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the usable cores)")
    parser.add_argument("extra", nargs="*", help="more task=benchmark overrides (key=value)")
    return parser.parse_args(argv)


def main() -> None:
    command = [sys.executable, str(ROOT / "main.py"), *overrides(parse_args(sys.argv[1:]))]
    print("running:", shlex.join(command), flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
