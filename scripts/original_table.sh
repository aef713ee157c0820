#!/usr/bin/env bash
# The original work's CIFAR-10 table in one command (meant for a GPU): train experiment=cifar10_vits_reg4
# (ViT-S/16 at 224, 4 registers, r=16), evaluate it unmerged, at r=16 and at (16,-1) with protect=prefix,
# apart and class, and print our numbers beside the original's.
#   bash scripts/original_table.sh [OUT_DIR] [extra overrides for every command...]
# e.g. on a machine without CIFAR-10 downloaded: dataset=imagefolder dataset.root=DIR dataset.native_size=32
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/original_table}
shift || true
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
RUN="$OUT/train"
resume=()
[ -f "$RUN/checkpoints/last.pt" ] && resume=(trainer.resume=true)
"$PY" main.py task=train experiment=cifar10_vits_reg4 hydra.run.dir="$RUN" "${resume[@]}" "$@"
rm -rf "$OUT/eval"
"$PY" main.py -m task=eval ckpt="$RUN/checkpoints/best.pt" 'tome.r=0,16,[16,-1.0]' tome.protect=prefix,apart,class \
    hydra.sweep.dir="$OUT/eval" "$@"
"$PY" - "$OUT/eval" <<'PYEOF'
import json, sys
from pathlib import Path

ORIGINAL = {"0": (76.81, 1.0), "16": (74.23, 1.75), "[16,-1.0]": (69.43, 2.48)}
runs = [json.loads(p.read_text()) for p in Path(sys.argv[1]).rglob("results.json")]
def key(r): return json.dumps(r).replace(" ", "")
base = {run["protect"]: run["images_per_s"] for run in runs if key(run["r"]) == "0"}
MODES = ("prefix", "apart", "class")
print("| r | original top-1 | original speedup | " + " | ".join(f"top-1 {m}" for m in MODES) + " | "
      + " | ".join(f"speedup {m}" for m in MODES) + " |")
print("|---|---:|---:|" + "---:|" * 2 * len(MODES))
for r, (top1, speedup) in ORIGINAL.items():
    ours = {run["protect"]: run for run in runs if key(run["r"]) == r}
    cells = [f"{ours[m]['top1']:.2f}" if m in ours else "-" for m in MODES]
    cells += [f"{ours[m]['images_per_s'] / base[m]:.2f}x" if m in ours and m in base else "-" for m in MODES]
    print(f"| {r} | {top1:.2f} | {speedup:.2f}x | " + " | ".join(cells) + " |")
device = runs[0]["device"] if runs else "?"
print(f"\nours: {device}, batch {runs[0]['batch_size'] if runs else '?'}, {runs[0]['dtype'] if runs else '?'}; "
      "speedup = eval images/s over the unmerged model's (r=0) of the same run")
PYEOF
