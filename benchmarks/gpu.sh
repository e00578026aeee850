#!/usr/bin/env bash
# The GPU benchmark: what the paper claims, on the hardware it was claimed on, in about 8 minutes.
#
#   1. Step time at the paper's width (3C1F 128 channels / Dense 500, batch 128) and of the MLP
#      784-512-256-10, for every optimizer: SGD, Adam, K-FAC (eigendecomposition and Cholesky
#      inverses), TENGraD at curvature freq 1 and 100, each with jit_solve off and on (XLA for the
#      m × m factorization and solves). Interleaved rounds, median and amortized mean, and their
#      ratios to SGD: benchmarks/step_time.py.
#   2. Fashion-MNIST time to 85/88/90 % test accuracy at the paper's width and presets, one seed,
#      all four optimizers: benchmarks/time_to_accuracy.py --config paper (3 epochs at most).
#
# Usage:
#   bash benchmarks/gpu.sh [OUT]            # on a machine with a GPU; OUT: benchmarks/results/gpu
#   bash benchmarks/gpu.sh --quick [OUT]    # the same commands, tiny, on any machine (CI runs this
#                                           # on a CPU so that the script cannot rot)
#
# Fashion-MNIST is read through TFDS from $TENGRAD_DATA_DIR (or the default data dir), prepared
# offline from Debian's dataset-fashion-mnist when it is not there yet (tengrad_tf.data).
# Every result records its date, commit, machine (GPUs included) and command. Without a GPU, and
# without --quick, the script stops at once: at full width on a CPU it would take hours
# (benchmarks/time_to_accuracy.py --config paper is the CPU route, with a budget of your choice).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
if [[ "${1:-}" == "--quick" ]]; then
    quick=true
    shift
fi
out="${1:-benchmarks/results/gpu}"

gpus=$(python -c 'import os; os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf; print(len(tf.config.list_physical_devices("GPU")))' 2>/dev/null)
if [[ "$quick" == false && "$gpus" == 0 ]]; then
    echo "benchmarks/gpu.sh: TensorFlow sees no GPU here. Run it on a GPU machine, or pass" \
         "--quick for the smoke run." >&2
    exit 2
fi
mkdir -p "$out"

optimizers=(sgd adam kfac-true kfac-true-cholesky
            tengrad-true-f1 tengrad-true-f1-jit tengrad-true-f100 tengrad-true-f100-jit)
if [[ "$quick" == true ]]; then
    step_args=(--models mlp --steps 2 --rounds 1 --warmup 1)
    tta_args=(--quick)
else
    step_args=(--models 3c1f mlp --steps 50 --rounds 3 --warmup 3)
    tta_args=(--config paper --seeds 1 --epochs 3 --eval-every 50)
fi

start=$SECONDS
python benchmarks/step_time.py "${step_args[@]}" --optimizers "${optimizers[@]}" --no-memory \
    --out "$out/step_time"
python benchmarks/time_to_accuracy.py "${tta_args[@]}" --out "$out/time_to_accuracy"
echo "benchmarks/gpu.sh: done in $((SECONDS - start)) s ($gpus GPU(s)); results under $out"
