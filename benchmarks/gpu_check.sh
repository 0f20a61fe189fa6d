#!/usr/bin/env bash
# GPU check, under 15 minutes on one H100/H200-class GPU: the CUDA tests, the compiled run and
# the fused rounding step (fused_quant) against eager on CUDA, then VGG-9 BC-ADAM on CIFAR-10
# with bf16 autocast, channels_last and torch.compile (benchmarks/gpu_check.py), the GPT's
# quantization overhead eager and fused (benchmarks/bench_lm.py --device cuda --fused), then
# qtrain against Brevitas on the GPU (skipped with a message when brevitas is not installed),
# then `qtrain speedrun` on CUDA: speednet with binary conv weights, seconds to 90% and 94%
# test accuracy (docs/speedrun.md).
#
#   bash benchmarks/gpu_check.sh [--data-dir ../shared/data]
#
# Each stage has its own time limit so a hung stage cannot eat the whole budget.
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
  'gpu_check.sh: torch sees no CUDA GPU; run it on a machine with one and a CUDA build of torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== CUDA tests"
timeout 180 python -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py \
  tests/test_data_loader.py tests/test_resume_generators.py tests/test_methods_invariants.py

echo "== torch.compile on CUDA: a compiled run against the eager run, and the fused rounding"
echo "   step (fused_quant, Triton) against the eager step bit for bit"
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_compiled_step.py \
  tests/test_fused_quant.py -k "cuda"

echo "== memory: the estimate of a step against torch.cuda.max_memory_allocated"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_memory_estimate.py -k cuda

echo "== VGG-9 BC-ADAM, bf16 autocast, channels_last, torch.compile"
timeout 300 python benchmarks/gpu_check.py "$@"

echo "== GPT 4x128 on CUDA: BC-ADAMW and SR-ADAMW eager and fused against FP-ADAMW"
timeout 240 python benchmarks/bench_lm.py --device cuda --fused --rounds 5

echo "== qtrain vs Brevitas on the GPU, VGG-9 width 1"
timeout 120 python benchmarks/bench_brevitas.py --device cuda --width 1.0 --chunk 20 "$@"

echo "== qtrain speedrun on CUDA: speednet width 1, binary conv weights, seconds to 90% / 94%"
speedrun_out=$(mktemp -d)
# The CPU preset with the GPU's batch (airbench's 1024, 49 steps an epoch), a warm-up scaled to
# it, and all 50,000 training images: the accuracy timed is the test set's, once per epoch. The
# line "binary seed 0: ... minutes to 90%: M min (S s)  94%: ..." holds the seconds.
timeout 240 python -m qtrain speedrun --config speedrun-binary --set device=cuda \
  --set width=1.0 --set batch_size=1024 --set warmup_steps=50 --set val_images=0 \
  --time-budget 180 --targets 90,94 --out "$speedrun_out" "$@"
