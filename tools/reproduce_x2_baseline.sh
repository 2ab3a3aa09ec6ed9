#!/usr/bin/env bash
# The 64-channel experiment of docs/results.md (issue #13): the EDSR-baseline x2 dense parent, then
# dup and one-shot magnitude at 90 % and 95 %, unstructured and 4x1 blocks, dup 80 % 4x1, the dense
# fine-tuning control (all with the same 2000-step budget), and x4 from the parent's body.
#
#   tools/reproduce_x2_baseline.sh [JOBS]   # JOBS runs in parallel, one torch thread each (default 2)
#
# Resumable: finished runs are skipped, a run that was cut off continues from its saved state.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-2}
source tools/runs.sh

bicubic 2 && bicubic 4
restore dense-x2-baseline edsr-baseline-x2-dense.safetensors   # the parent, once finished and committed
train dense-x2-baseline configs/dense-x2-baseline.toml   # 16000 steps: several sessions
evaluate dense-x2-baseline &

# name config [--set key=value ...], in the order they are worth having: the 90 % pair, the 95 %
# pair (DUP vs magnitude), then x4 from the 64-channel body, the dense control, x4 from the
# 32-channel body (rule 4 compares the two x4 runs), then the remaining block-sparse runs.
X2=configs/dup-x2-baseline.toml MX2=configs/magnitude-x2-baseline.toml X4=configs/dup-x4-baseline.toml
cat > runs/x2-baseline-jobs.txt <<JOBS
dup-x2b-s90 $X2 --set prune.sparsity=0.9 --set prune.granularity=1x1
magnitude-x2b-s90 $MX2 --set prune.sparsity=0.9 --set prune.granularity=1x1
dup-x2b-s90-4x1 $X2 --set prune.sparsity=0.9 --set prune.granularity=4x1
magnitude-x2b-s90-4x1 $MX2 --set prune.sparsity=0.9 --set prune.granularity=4x1
dup-x2b-s95 $X2 --set prune.sparsity=0.95 --set prune.granularity=1x1
magnitude-x2b-s95 $MX2 --set prune.sparsity=0.95 --set prune.granularity=1x1
dup-x4b-s90-4x1 $X4
dense-x2b-ft configs/dense-x2-baseline-ft.toml
dup-x4-long-s90-4x1 $X4 --set model.arch=edsr-cpu --set model.init=checkpoints/edsr-cpu-x2-dense-long.safetensors
dup-x2b-s95-4x1 $X2 --set prune.sparsity=0.95 --set prune.granularity=4x1
magnitude-x2b-s95-4x1 $MX2 --set prune.sparsity=0.95 --set prune.granularity=4x1
dup-x2b-s80-4x1 $X2 --set prune.sparsity=0.8 --set prune.granularity=4x1
JOBS
# xargs splits each line into words: train NAME CONFIG OPTIONS..., then score NAME.
xargs -P "$JOBS" -L 1 bash -c 'train "$0" "$@" && evaluate "$0"' < runs/x2-baseline-jobs.txt
wait
