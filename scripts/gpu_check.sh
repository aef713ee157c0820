#!/usr/bin/env bash
# The whole GPU story in one command (about 5-8 minutes on one H100-class GPU, no network):
#   bash scripts/gpu_check.sh [OUT_DIR]        (default: gpu_check/<date>_<time>)
# 1. the CUDA tests (python -m pytest -m cuda)
# 2. task=benchmark at fp16, batch 1/64/256, r = 0, 8, 13, 16, (16,-1), with the training step and the loader
# 3. scripts/benchmark_patch.py --registers 4 --device cuda --batch 64 --amp fp16 (the library alone),
#    also on DINOv3 ViT-S/16 (RoPE, 4 storage tokens) and the SigLIP ViT-B/16 tower (attention pooling)
# 4. a short training throughput run of the original recipe (ViT-S/16 at 224, 4 registers, r=16, fp16)
#    on generated 32 px images through the real loader path (workers, augmentation, resize on the GPU)
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
WORKERS=$("$PY" -c "import os; print(min(8, len(os.sched_getaffinity(0))))")
status=0
step() { echo "== $1"; }

step "CUDA tests"
"$PY" -m pytest -m cuda -q -p no:cacheprovider 2>&1 | tee "$OUT/cuda_tests.txt" | tail -3 || status=1

step "generated 32 px image folder"
"$PY" scripts/make_image_folder.py "$OUT/images" --size 32 --per-class 1000 --val-per-class 50 > /dev/null || status=1

step "task=benchmark (fp16, batch 1/64/256)"
"$PY" main.py task=benchmark runtime.device=cuda runtime.amp=fp16 dataset=imagefolder dataset.root="$OUT/images" \
    dataset.native_size=32 trainer.batch_size=256 runtime.num_workers="$WORKERS" \
    'benchmark.r=[0,8,13,16,[16,-1.0]]' 'benchmark.batch_sizes=[1,64,256]' hydra.run.dir="$OUT/benchmark" \
    > "$OUT/benchmark.log" 2>&1 || status=1

step "library benchmark (benchmark_patch.py)"
"$PY" scripts/benchmark_patch.py --registers 4 --device cuda --batch 64 --amp fp16 > "$OUT/benchmark_patch.txt" 2>&1 || status=1
for model in vit_small_patch16_dinov3 vit_base_patch16_siglip_224; do
    "$PY" scripts/benchmark_patch.py --model "$model" --device cuda --batch 64 --amp fp16 \
        > "$OUT/benchmark_patch_$model.txt" 2>&1 || status=1
done

step "training throughput: ViT-S/16 224, 4 registers, r=16, fp16, real loader path"
"$PY" main.py task=train experiment=cifar10_vits_reg4 runtime.device=cuda runtime.amp=fp16 dataset=imagefolder \
    dataset.root="$OUT/images" dataset.native_size=32 trainer.batch_size=256 runtime.num_workers="$WORKERS" \
    trainer.epochs=1 trainer.max_steps_per_epoch=60 trainer.warmup_epochs=0 hydra.run.dir="$OUT/train" \
    > "$OUT/train.log" 2>&1 || status=1

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
         "- dtype fp16 (autocast) for every figure; batch sizes as each table says", ""]
lines += ["## CUDA tests", "```", read("cuda_tests.txt").splitlines()[-1] if (out / "cuda_tests.txt").exists() else "missing", "```", ""]
lines += ["## task=benchmark (ViT-S/16 at 224, 4 registers; loader: generated 32 px PNGs)", read("benchmark/benchmark.md"), ""]
lines += ["## The library alone (batch 64)", "```", read("benchmark_patch.txt"), "```", ""]
for model in ("vit_small_patch16_dinov3", "vit_base_patch16_siglip_224"):
    lines += [f"## {model} (batch 64)", "```", read(f"benchmark_patch_{model}.txt"), "```", ""]
train = out / "train" / "results.json"
if train.exists():
    record = json.loads(train.read_text())
    history = record["history"][-1]
    lines += ["## Training throughput (original recipe, r=16, batch 256, fp16, real loader path)",
              f"- {history['train_images_per_s']:.0f} images/s over {record['metrics'].get('epoch', 1)} short epoch "
              f"({record.get('model')}, {record['device']})", ""]
else:
    lines += ["## Training throughput", "(missing: see train.log)", ""]
lines += [f"exit status: {'all steps passed' if status == 0 else 'a step failed: see the logs in this folder'}"]
(out / "report.md").write_text("\n".join(lines) + "\n")
print((out / "report.md").read_text())
PYEOF
echo "wrote $OUT/report.md"
exit $status
