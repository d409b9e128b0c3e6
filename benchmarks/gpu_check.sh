#!/usr/bin/env bash
# GPU check on one NVIDIA GPU, at most 8 minutes: inference, training-step and real-epoch tables into docs/reports/
# (benchmarks/gpu_check.py says what is measured). The argument is CIFAR-10 as a datasets folder (train and test
# splits); without it the real epochs run on the shipped 10,000-image sample. Further arguments go to gpu_check.py
# (e.g. --train-args "--workers 8"); PYTHON picks the interpreter.
#
#     benchmarks/gpu_check.sh /data/cifar10
set -euo pipefail
cd "$(dirname "$0")/.."
dataset=${1:-timm_dirac/assets/cifar10_sample}
shift $(( $# > 0 ? 1 : 0 ))
# the script stops starting work after 450 s; at 480 s it is interrupted (it then writes what it measured), and
# killed 20 s later if it has not stopped
exec timeout --signal=INT --kill-after=20 480 "${PYTHON:-python}" benchmarks/gpu_check.py --device cuda \
    --out docs/reports --budget-s 450 --dataset "${dataset}" "$@"
