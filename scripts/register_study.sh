#!/usr/bin/env bash
# Does protecting registers matter? Train small 4-register ViTs on real CIFAR-10 images, evaluate each
# at r = 0, 2, 4, 6, 8, (8,-1) with protect=prefix and protect=class, and compare them sample by sample.
#   bash scripts/register_study.sh CIFAR10_CLASS_FOLDERS [OUT_DIR]
# CIFAR10_CLASS_FOLDERS: e.g. ../shared/data/cifar10-train (50,000 images); the last 500 of each class
# are held out for evaluation and never tuned on. Resumable: run it again and it goes on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${1:?usage: bash scripts/register_study.sh CIFAR10_CLASS_FOLDERS [OUT_DIR]}
OUT=${2:-outputs/register_study}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
SPLIT="$OUT/data"
DEVICE=${DEVICE:-auto}
[ -d "$SPLIT/val" ] || "$PY" scripts/split_image_folder.py "$SOURCE" "$SPLIT" --val-per-class 500

train() {  # train NAME [overrides...]: fresh, resumed, or skipped when finished
    local name=$1; shift
    local dir="$OUT/train/$name"
    if [ -f "$dir/results.json" ] && "$PY" - "$dir/checkpoints/last.pt" <<'PYEOF'; then
import sys, torch
checkpoint = torch.load(sys.argv[1], weights_only=True, mmap=True)
sys.exit(0 if checkpoint["state"]["epoch"] >= checkpoint["config"]["trainer"]["epochs"] else 1)
PYEOF
        echo "$name: trained"; return
    fi
    local resume=()
    [ -f "$dir/checkpoints/last.pt" ] && resume=(trainer.resume=true)
    "$PY" main.py task=train experiment=register_study dataset.root="$SPLIT" runtime.device="$DEVICE" \
        hydra.run.dir="$dir" "${resume[@]}" "$@"
}

evaluate() {  # evaluate NAME GROUP: 6 schedules x 2 protection modes on the held-out images
    local name=$1 group=$2
    local dir="$OUT/eval/$group/$name"
    if [ "$(find "$dir" -name results.json 2>/dev/null | wc -l)" -ge 12 ]; then echo "$name: evaluated"; return; fi
    rm -rf "$dir"
    "$PY" main.py -m task=eval ckpt="$OUT/train/$name/checkpoints/best.pt" dataset.root="$SPLIT" \
        'tome.r=0,2,4,6,8,[8,-1.0]' tome.protect=prefix,class runtime.device="$DEVICE" trainer.batch_size=250 \
        runtime.num_workers=1 hydra.sweep.dir="$dir"
}

report() {  # paired deltas of protect=class against protect=prefix, per checkpoint and pooled
    "$PY" scripts/sweep_report.py "$OUT/eval/$1" --paired protect --baseline prefix > /dev/null
    echo "report: $OUT/eval/$1/sweep.md"
}

# 1. three seeds trained without merging, each evaluated both ways
for seed in 0 1 2; do train "seed$seed" seed=$seed; done
for seed in 0 1 2; do evaluate "seed$seed" trained_without_merging; done
report trained_without_merging
# 2. one seed trained with merging (r=4) under each protection mode, each evaluated both ways
train r4_prefix seed=0 tome.r=4 tome.protect=prefix
train r4_class seed=0 tome.r=4 tome.protect=class
for name in r4_prefix r4_class; do evaluate "$name" trained_with_merging; done
report trained_with_merging
