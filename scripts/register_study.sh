#!/usr/bin/env bash
# Does protecting registers matter, and how? Train 4-register ViTs on real CIFAR-10 images, evaluate each
# checkpoint at r = 0, 2, 4, 6, 8, (8,-1) under protect=apart (the default), prefix and class, and at one
# aggressive FLOP budget (a third of the unmerged GFLOPs; r chosen per mode by tome.flops, because the cap
# lets the modes merge different counts at one r), and compare the modes sample by sample (paired
# bootstrap intervals, exact McNemar p-values).
#   bash scripts/register_study.sh CIFAR10_CLASS_FOLDERS [OUT_DIR] [PART]
# CIFAR10_CLASS_FOLDERS: e.g. ../shared/data/cifar10-train (50,000 images); the last 500 of each class are
# held out and never tuned on: every checkpoint evaluated is the final one (last.pt), not one chosen on them.
# PART: long (default: width 192, 15 epochs, SEEDS="0 1", plus seed 0 trained with merging under apart),
#       short (width 128, 5 epochs, seeds 0-2), or all. Resumable: run it again and it goes on where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${1:?usage: bash scripts/register_study.sh CIFAR10_CLASS_FOLDERS [OUT_DIR] [long|short|all]}
OUT=${2:-outputs/register_study}
PART=${3:-long}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
SPLIT="$OUT/data"
DEVICE=${DEVICE:-auto}
SEEDS=${SEEDS:-"0 1"}
[ -d "$SPLIT/val" ] || "$PY" scripts/split_image_folder.py "$SOURCE" "$SPLIT" --val-per-class 500

train() {  # train NAME EXPERIMENT [overrides...]: fresh, resumed, or skipped when finished
    local name=$1 experiment=$2; shift 2
    local dir="$OUT/train/$name"
    if [ -f "$dir/results.json" ]; then echo "$name: trained"; return; fi
    local resume=()
    [ -f "$dir/checkpoints/last.pt" ] && resume=(trainer.resume=true)
    local start=$SECONDS
    "$PY" main.py task=train experiment="$experiment" dataset.root="$SPLIT" runtime.device="$DEVICE" \
        hydra.run.dir="$dir" "${resume[@]}" "$@"
    echo "$name: $((SECONDS - start)) s this invocation" >> "$OUT/train_times.txt"
}

BUDGET=${BUDGET:-0.33}  # the aggressive budget: this fraction of the unmerged model's GFLOPs

evaluate() {  # evaluate NAME GROUP: 6 schedules x 3 protection modes, and the budget x 3 modes, held out
    local name=$1 group=$2
    local dir="$OUT/eval/$group/$name" ckpt="$OUT/train/$name/checkpoints/last.pt"
    local common=(dataset.root="$SPLIT" runtime.device="$DEVICE" runtime.eval_batch_size=250 runtime.num_workers=1)
    if [ "$(find "$dir/r" -name results.json 2>/dev/null | wc -l)" -lt 18 ]; then
        rm -rf "$dir/r"
        "$PY" main.py -m task=eval ckpt="$ckpt" 'tome.r=0,2,4,6,8,[8,-1.0]' tome.protect=apart,prefix,class \
            "${common[@]}" hydra.sweep.dir="$dir/r"
    fi
    if [ "$(find "$dir/budget" -name results.json 2>/dev/null | wc -l)" -lt 3 ]; then
        rm -rf "$dir/budget"
        "$PY" main.py -m task=eval ckpt="$ckpt" tome.flops="$BUDGET" tome.protect=apart,prefix,class \
            "${common[@]}" hydra.sweep.dir="$dir/budget"
    fi
    echo "$name: evaluated"
}

report() {  # every pair of modes: each against apart (the default), then class against prefix
    for baseline in apart prefix; do
        "$PY" scripts/sweep_report.py "$OUT/eval/$1" --paired protect --baseline "$baseline" > /dev/null
    done
    echo "reports: $OUT/eval/$1/paired_protect_vs_apart.md, paired_protect_vs_prefix.md"
}

if [ "$PART" = short ] || [ "$PART" = all ]; then  # 5 epochs, width 128 (the first study)
    for seed in 0 1 2; do train "seed$seed" register_study seed=$seed; done
    for seed in 0 1 2; do evaluate "seed$seed" short; done
    report short
fi
if [ "$PART" = long ] || [ "$PART" = all ]; then  # 15 epochs, width 192; and one seed trained with merging
    for seed in $SEEDS; do train "long_seed$seed" register_study_long seed=$seed; done
    train long_r4_apart register_study_long seed=0 tome.r=4 tome.protect=apart
    for seed in $SEEDS; do evaluate "long_seed$seed" long; done
    report long
    evaluate long_r4_apart long_trained_with_merging
    report long_trained_with_merging
fi
