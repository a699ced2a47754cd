#!/bin/bash
# Every GPU figure docs/performance.md reports, on a CUDA machine, from the project root:
#   bash benchmarks/gpu_check.sh NPZ_FOLDER [PART] [RUNS]
# NPZ_FOLDER holds train.npz and test.npz (x: uint8 N,32,32,3; y: labels) of the CIFAR-10 copy.
# PART, each limited to under ten minutes:
#   fast      RUNS times each (default 5): fast-muon in bf16, fast in bf16 and fp32, fast-muon in
#             bf16 with torch.compile
#   keras     keras-book 3 times plain, 3 times as one CUDA graph per step, 3 times as a graph in
#             bf16, same seeds
#   rest      augmentation throughput and its share of a GPU training epoch (no CPU paths);
#             best once in bf16
#   true      half-precision weights beside bf16 autocast: fast-muon and fast RUNS times each,
#             keras-book as a CUDA graph 3 times in fp16-true, bf16-true, bf16 and fp16-true
#             compiled, best once
#   autotune  fast-muon with fp16 weights, as airbench94_muon trains, RUNS times compiled in
#             max-autotune mode (minutes of compilation first)
#   select    best-select (hard-example selection, the candidate for best's time goal) once and
#             best once, both in bf16
#   sync      the code lines that make the host wait for the GPU during one epoch of fast-muon,
#             fast and keras-book, each after a warm-up
#   open      what docs/performance.md lists as not yet measured, most important first, within BUDGET
#             seconds in all (environment, default 540): fast-muon in fp16-true beside bf16, RUNS
#             times each; fast-muon fp16-true compiled; the smoke check; best-select and best once
#             each in bf16;
#             keras-book as a CUDA graph in fp16-true, bf16-true, bf16 and fp16-true compiled,
#             3 times each; best in fp16-true once; the sync check; a profile of keras-book's
#             eager bf16 step (the kernels its CUDA graph replays and their GPU time, against
#             the 2 s goal; eager, as PyTorch's profiler has had bugs with graph replays). A step starts
#             only with MIN_LEFT seconds or more left (environment, default 30: less starts nothing
#             useful), and is cut off when the budget runs out
#   smoke     the options and commands no GPU has run yet, once each on 2,000 training images
#             (benchmarks/gpu_smoke.py): ok or FAILED, and a line of what each printed
#   all       the default: fast, keras and rest
# Each step has a time limit, so one that hangs does not take the others with it.
set -uo pipefail
export PYTHONUNBUFFERED=1
NPZ=${1:?usage: bash benchmarks/gpu_check.sh NPZ_FOLDER [fast|keras|rest|autotune|true|select|sync|smoke|open|all] [RUNS]}
PART=${2:-all}
N=${3:-5}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$PART" = fast ] || [ "$PART" = all ]; then
  timeout 420 python benchmarks/gpu_speed.py --npz "$NPZ" --runs "$N" --recipes fast-muon:bf16 fast:bf16 fast:fp32 fast-muon:bf16:compile
fi
if [ "$PART" = keras ] || [ "$PART" = all ]; then
  timeout 300 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 3 \
    --recipes keras-book keras-book:cuda-graph keras-book:cuda-graph:bf16
fi
if [ "$PART" = rest ] || [ "$PART" = all ]; then
  timeout 150 python benchmarks/augment_throughput.py --data "$NPZ" --rounds 3 --skip-cpu --scipy-images 2000
  timeout 240 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 1 --recipes best:bf16
fi
if [ "$PART" = autotune ]; then
  timeout 560 python benchmarks/gpu_speed.py --npz "$NPZ" --runs "$N" --recipes fast-muon:fp16-true:max-autotune
fi
if [ "$PART" = true ]; then
  timeout 240 python benchmarks/gpu_speed.py --npz "$NPZ" --runs "$N" \
    --recipes fast-muon:fp16-true fast-muon:bf16 fast:fp16-true fast:bf16
  timeout 240 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 3 \
    --recipes keras-book:cuda-graph:fp16-true keras-book:cuda-graph:bf16-true keras-book:cuda-graph:bf16 \
    keras-book:cuda-graph:fp16-true:compile
  timeout 100 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 1 --recipes best:fp16-true
fi
if [ "$PART" = select ]; then
  timeout 300 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 1 --recipes best-select:bf16 best:bf16
fi
if [ "$PART" = sync ]; then
  timeout 200 python benchmarks/gpu_speed.py --npz "$NPZ" --sync-check \
    --recipes fast-muon:bf16 fast-muon:fp16-true fast:bf16 keras-book:cuda-graph:bf16
fi
if [ "$PART" = smoke ]; then
  timeout 300 python benchmarks/gpu_smoke.py --npz "$NPZ"
fi
if [ "$PART" = open ]; then
  BUDGET=${BUDGET:-540}
  MIN_LEFT=${MIN_LEFT:-30}
  start=$SECONDS
  # step LIMIT COMMAND...: run COMMAND for at most LIMIT seconds, or what is left of the budget.
  step() {
    local limit=$1 left=$((BUDGET - (SECONDS - start)))
    shift
    if [ "$left" -lt "$MIN_LEFT" ]; then echo "not run, ${left} s of the budget left: $*"; return; fi
    timeout $((limit < left ? limit : left)) "$@"
  }
  step 150 python benchmarks/gpu_speed.py --npz "$NPZ" --runs "$N" --recipes fast-muon:fp16-true fast-muon:bf16
  step 200 python benchmarks/gpu_speed.py --npz "$NPZ" --runs "$N" --recipes fast-muon:fp16-true:compile
  step 120 python benchmarks/gpu_smoke.py --npz "$NPZ"
  step 200 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 1 --recipes best-select:bf16 best:bf16
  step 180 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 3 \
    --recipes keras-book:cuda-graph:fp16-true keras-book:cuda-graph:bf16-true keras-book:cuda-graph:bf16 \
    keras-book:cuda-graph:fp16-true:compile
  step 80 python benchmarks/gpu_speed.py --npz "$NPZ" --runs 1 --recipes best:fp16-true
  step 120 python benchmarks/gpu_speed.py --npz "$NPZ" --sync-check \
    --recipes fast-muon:bf16 fast-muon:fp16-true fast:bf16 keras-book:cuda-graph:bf16
  step 90 python benchmarks/gpu_profile.py --npz "$NPZ" --entry keras-book:bf16 --epochs 2 --rows 40
  echo "part open: $((SECONDS - start)) s"
fi
