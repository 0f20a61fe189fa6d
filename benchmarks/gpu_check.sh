#!/usr/bin/env bash
# GPU check, under 10 minutes on one H100/H200-class GPU: the CUDA tests, the compiled run and
# the fused rounding step (fused_quant) against eager on CUDA, the memory estimate against the
# measured peak, VGG-9 BC-ADAM with bf16 autocast, channels_last and torch.compile
# (benchmarks/gpu_check.py), the GPT's quantization overhead eager and fused
# (benchmarks/bench_lm.py --device cuda --fused), qtrain against Brevitas on the GPU (skipped
# with a message when brevitas is not installed), then `qtrain speedrun` on CUDA: speednet with
# binary conv weights, seconds to 90% and 94% test accuracy (docs/speedrun.md).
#
#   bash benchmarks/gpu_check.sh [--data-dir ../shared/data]
#
# --data-dir is the folder holding cifar-10-batches-py and tinyshakespeare. Without CIFAR-10
# there, VGG-9, Brevitas and the speedrun train on random images of CIFAR-10's shape and count:
# their speed figures hold, their accuracies mean nothing. Without tiny Shakespeare the GPT
# stage is skipped. Each stage has its own time limit, so a hung stage cannot eat the whole
# budget, and a failed stage does not stop the next; the last line lists the failed stages and
# the exit code is non-zero when there are any.
set -uo pipefail
cd "$(dirname "$0")/.."

data_dir=../shared/data
while [[ $# -gt 0 ]]; do
  case $1 in
    --data-dir) data_dir=${2:?--data-dir needs a folder}; shift 2 ;;
    --data-dir=*) data_dir=${1#*=}; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1'; the only option is --data-dir DIR" >&2; exit 2 ;;
  esac
done

python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
  'gpu_check.sh: torch sees no CUDA GPU; run it on a machine with one and a CUDA build of torch')" \
  || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

failed=()
stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under a time limit, note a failure
  local name=$1 limit=$2; shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "-- $name: exit $rc after $((SECONDS - start)) s"
  [[ $rc -eq 0 ]] || failed+=("$name (exit $rc)")
}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cifar_dir=$data_dir speedrun_budget=180
if [[ ! -f $data_dir/cifar-10-batches-py/data_batch_1 ]]; then
  echo "CIFAR-10 not under $data_dir: random images of its shape stand in (speed figures only)"
  cifar_dir=$scratch/cifar speedrun_budget=60  # no accuracy to wait for: the step rate only
  python -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from speed_common import write_synthetic_cifar10; write_synthetic_cifar10(Path('$cifar_dir'), 10_000)"
fi

stage "CUDA tests" 180 python -m pytest -q -p no:cacheprovider tests/test_cuda_paths.py \
  tests/test_data_loader.py tests/test_resume_generators.py tests/test_methods_invariants.py

# A compiled run against the eager run, and the fused rounding step (Triton) against the eager
# step bit for bit.
stage "torch.compile and fused_quant on CUDA" 240 python -m pytest -q -p no:cacheprovider \
  tests/test_compiled_step.py tests/test_fused_quant.py -k cuda

stage "memory estimate against torch.cuda.max_memory_allocated" 90 \
  python -m pytest -q -p no:cacheprovider tests/test_memory_estimate.py -k cuda

stage "VGG-9 BC-ADAM, bf16 autocast, channels_last, torch.compile" 180 \
  python benchmarks/gpu_check.py --data-dir "$cifar_dir" --epochs 3

if [[ -f $data_dir/tinyshakespeare/input.txt ]]; then
  stage "GPT 4x128 on CUDA, bf16: BC-ADAMW and SR-ADAMW eager and fused against FP-ADAMW" 180 \
    python benchmarks/bench_lm.py --device cuda --fused --rounds 5 --amp bf16 \
    --data-dir "$data_dir/tinyshakespeare"
else
  echo "== GPT stage skipped: no tinyshakespeare/input.txt under $data_dir"
fi

stage "qtrain vs Brevitas on the GPU, VGG-9 width 1" 120 \
  python benchmarks/bench_brevitas.py --device cuda --width 1.0 --chunk 20 --data-dir "$cifar_dir"

# The CPU preset with the GPU's batch (airbench's 1024, 49 steps an epoch), a warm-up scaled to
# it, and all 50,000 training images: the accuracy timed is the test set's, once per epoch. The
# line "binary seed 0: ... minutes to 90%: M min (S s)  94%: ..." holds the seconds.
stage "qtrain speedrun on CUDA: speednet width 1, binary conv weights" $((speedrun_budget + 60)) \
  python -m qtrain speedrun --config speedrun-binary --set device=cuda \
  --set width=1.0 --set batch_size=1024 --set warmup_steps=50 --set val_images=0 \
  --time-budget "$speedrun_budget" --targets 90,94 --out "$scratch/speedrun" --data-dir "$cifar_dir"

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "gpu_check.sh: ${#failed[@]} stage(s) failed: ${failed[*]}"
  exit 1
fi
echo "gpu_check.sh: every stage passed"
