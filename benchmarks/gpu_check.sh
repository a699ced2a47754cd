#!/bin/bash
# Every GPU figure the README reports, in one run on a CUDA machine, from the project root:
#   bash benchmarks/gpu_check.sh NPZ_FOLDER [RUNS]
# NPZ_FOLDER holds train.npz and test.npz (x: uint8 N,32,32,3; y: labels) of the CIFAR-10 copy.
# RUNS (default 5) is the number of runs of the fast recipe; keras-book runs 3 times plain and 3
# times as one CUDA graph per step (same seeds), best once. Each step has a time limit, so one
# that hangs does not take the others with it.
set -uo pipefail
export PYTHONUNBUFFERED=1
NPZ=${1:?usage: bash benchmarks/gpu_check.sh NPZ_FOLDER [RUNS]}
N=${2:-5}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 240 python benchmarks/gpu_speed.py --npz "$NPZ" --runs "$N" --recipes fast
timeout 300 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 3 --recipes keras-book keras-book:cuda-graph
timeout 150 python benchmarks/augment_throughput.py --data "$NPZ" --rounds 3
timeout 200 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 1 --recipes best
