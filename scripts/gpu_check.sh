#!/usr/bin/env bash
# The whole GPU story in one command (about 10 minutes on one H100-class GPU, no network):
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: gpu_check/<date>_<time>)
# 1. the CUDA tests (python -m pytest -m cuda): the default protection (apart) and prefix beside it
# 2. scripts/benchmark_patch.py, eager, fp16, batch 64: r=16 and (16,-1) under apart and prefix, and the
#    register models of the day (DINOv3 ViT-S/16, the SigLIP ViT-B/16 tower)
# 3. compiled rows (torch.compile, inductor): fp16 at batch 1 (with CUDA graphs: reduce-overhead), 64 and
#    256, bf16 at batch 64; unpatched against r=16, latency and images/s, compile time apart
# 4. task=benchmark at fp16, batch 1/64/256, r = 0, 8, 13, 16, (16,-1), with the training step and the loader
# 5. a short training throughput run of the original recipe (ViT-S/16 at 224, 4 registers, r=16, fp16)
#    on generated 32 px images through the real loader path (workers, augmentation, resize on the GPU)
# Every step has its own time limit (STEP_LIMIT seconds, default 300): a slow one is reported, the rest run.
# Everything lands in OUT_DIR, with report.md naming device, torch/timm versions, batch and dtype.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: no CUDA GPU visible to torch; run scripts/gpu_check.sh on a machine with one (the CPU path is tested by python -m pytest)" >&2
    exit 2
fi
OUT=${1:-gpu_check/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export REGTOME_RUN_ID=gpu-check
LIMIT=${STEP_LIMIT:-300}
WORKERS=$("$PY" -c "import os; print(min(8, len(os.sched_getaffinity(0))))")
status=0
step() { echo "== $1"; }
run() { local log=$1; shift; timeout "$LIMIT" "$@" > "$OUT/$log" 2>&1 || { echo "   failed or over ${LIMIT} s: see $log"; status=1; }; }

step "CUDA tests"
timeout "$LIMIT" "$PY" -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt" | tail -3 || status=1

step "library benchmark, eager (fp16, batch 64): apart and prefix"
run benchmark_patch.txt "$PY" scripts/benchmark_patch.py --registers 4 --device cuda --batch 64 --amp fp16 \
    --r "[16, (16, -1.0)]" --protect apart,prefix hydra.run.dir="$OUT/benchmark_patch"
for model in vit_small_patch16_dinov3 vit_base_patch16_siglip_224; do
    run "benchmark_patch_$model.txt" "$PY" scripts/benchmark_patch.py --model "$model" --device cuda --batch 64 --amp fp16 \
        hydra.run.dir="$OUT/benchmark_patch_$model"
done

step "compiled rows (inductor): fp16 batch 1 (+ CUDA graphs), 64, 256; bf16 batch 64"
for spec in "fp16 1" "fp16 64" "fp16 256" "bf16 64"; do
    set -- $spec
    run "compiled_$1_b$2.txt" "$PY" scripts/benchmark_patch.py --registers 4 --device cuda --amp "$1" --batch "$2" \
        --r "[16]" --compile default --repeats 7 --iters 5 hydra.run.dir="$OUT/compiled_$1_b$2"
done

step "generated 32 px image folder"
"$PY" scripts/make_image_folder.py "$OUT/images" --size 32 --per-class 1000 --val-per-class 50 > /dev/null || status=1

step "task=benchmark (fp16, batch 1/64/256)"
run benchmark.log "$PY" main.py task=benchmark runtime.device=cuda runtime.amp=fp16 dataset=imagefolder \
    dataset.root="$OUT/images" trainer.batch_size=256 runtime.num_workers="$WORKERS" \
    'benchmark.r=[0,8,13,16,[16,-1.0]]' 'benchmark.batch_sizes=[1,64,256]' hydra.run.dir="$OUT/benchmark"

step "training throughput: ViT-S/16 224, 4 registers, r=16, fp16, real loader path"
run train.log "$PY" main.py task=train experiment=cifar10_vits_reg4 runtime.device=cuda runtime.amp=fp16 \
    dataset=imagefolder dataset.root="$OUT/images" trainer.batch_size=256 runtime.num_workers="$WORKERS" \
    trainer.epochs=1 trainer.max_steps_per_epoch=60 trainer.warmup_epochs=0 hydra.run.dir="$OUT/train"

step "report"
"$PY" - "$OUT" "$status" <<'PYEOF'
import json, sys
from pathlib import Path

import timm, torch

out, status = Path(sys.argv[1]), int(sys.argv[2])
def read(name):
    path = out / name
    return path.read_text().strip() if path.exists() else f"(missing: see {name.replace('.txt', '.log')})"
lines = [f"# RegToMe GPU check\n", f"- device: {torch.cuda.get_device_name(0)}",
         f"- torch {torch.__version__}, timm {timm.__version__}, CUDA {torch.version.cuda}",
         "- dtype and batch: as each table says (autocast; protect=apart, the default, unless a row says prefix)", ""]
tests = out / "cuda_tests.txt"
lines += ["## CUDA tests", "```", tests.read_text().strip().splitlines()[-1] if tests.exists() else "missing", "```", ""]
lines += ["## The library, eager (fp16, batch 64)", "```", read("benchmark_patch.txt"), "```", ""]
for model in ("vit_small_patch16_dinov3", "vit_base_patch16_siglip_224"):
    lines += [f"## {model} (fp16, batch 64)", "```", read(f"benchmark_patch_{model}.txt"), "```", ""]
for dtype, batch in (("fp16", 1), ("fp16", 64), ("fp16", 256), ("bf16", 64)):
    lines += [f"## Eager and compiled, {dtype}, batch {batch}", "```", read(f"compiled_{dtype}_b{batch}.txt"), "```", ""]
lines += ["## task=benchmark (ViT-S/16 at 224, 4 registers; loader: generated 32 px PNGs)", read("benchmark/benchmark.md"), ""]
train = out / "train" / "results.json"
if train.exists():
    record = json.loads(train.read_text())
    history = record["history"][-1]
    lines += ["## Training throughput (original recipe, r=16, batch 256, fp16, real loader path)",
              f"- {history['train_images_per_s']:.0f} images/s over one short epoch ({record.get('model')}, "
              f"{record['device']})", ""]
else:
    lines += ["## Training throughput", "(missing: see train.log)", ""]
lines += [f"exit status: {'all steps passed' if status == 0 else 'a step failed: see the logs in this folder'}"]
(out / "report.md").write_text("\n".join(lines) + "\n")
print((out / "report.md").read_text())
PYEOF
echo "wrote $OUT/report.md"
exit $status
