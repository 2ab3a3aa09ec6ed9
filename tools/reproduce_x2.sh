#!/usr/bin/env bash
# The x2 pruning experiment of docs/results.md: dense parent, then magnitude and dup at several
# sparsities with the same fine-tuning budget, then PSNR/SSIM on Set5, Set14, BSD100.
#
#   tools/reproduce_x2.sh [JOBS]     # JOBS runs in parallel, one torch thread each (default 2)
#
# Runs that already have model.safetensors are skipped, so the script can be re-run to resume.
# Results land in runs/<name>/eval.json; tools/results_table.py turns them into docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-2}
source tools/runs.sh

bicubic 2
train dense-x2 configs/dense-x2.toml
evaluate dense-x2 &  # overlaps the first pruning runs

# name config sparsity seed [extra overrides] — the 90% rows twice (seeds 0 and 1), then the
# ablations of dup at 90%: each part of "balanced learning" (layer balance, soft shrinkage) switched
# off in turn.
cat > runs/x2-jobs.txt <<'JOBS'
magnitude-x2-s90 configs/magnitude-x2.toml 0.9 0
dup-x2-s90 configs/dup-x2.toml 0.9 0
magnitude-x2-s75 configs/magnitude-x2.toml 0.75 0
dup-x2-s75 configs/dup-x2.toml 0.75 0
magnitude-x2-s90-seed1 configs/magnitude-x2.toml 0.9 1
dup-x2-s90-seed1 configs/dup-x2.toml 0.9 1
magnitude-x2-s50 configs/magnitude-x2.toml 0.5 0
dup-x2-s50 configs/dup-x2.toml 0.5 0
dup-x2-s90-nobalance configs/dup-x2.toml 0.9 0 --set prune.balance=uniform --set prune.min_density=0
dup-x2-s90-noshrink configs/dup-x2.toml 0.9 0 --set prune.shrink=none
JOBS
xargs -P "$JOBS" -L 1 bash -c 'train "$0" "$1" --set prune.sparsity="$2" --set train.seed="$3" "${@:4}" && evaluate "$0"' < runs/x2-jobs.txt

# The longer-trained parent (2500 more steps from dense-x2's checkpoint), and dup at 65, 75 and 90% from it:
# the shipped models (docs/models.md).
train dense-x2-long configs/dense-x2-long.toml
evaluate dense-x2-long &
for s in 65 75 90; do
    train dup-x2-long-s$s configs/dup-x2.toml --set model.init=runs/dense-x2-long/model.safetensors \
        --set prune.sparsity=0.$s && evaluate dup-x2-long-s$s
done
# 500 more steps for the 75 % and 90 % models (configs/dup-x2-more.toml), and the magnitude controls
# from the longer parent.
train dup-x2-long-s75-more configs/dup-x2-more.toml && evaluate dup-x2-long-s75-more
train dup-x2-long-s90-more configs/dup-x2-more.toml --set model.init=runs/dup-x2-long-s90/model.safetensors \
    --set prune.sparsity=0.9 --set prune.initial_sparsity=0.9 && evaluate dup-x2-long-s90-more
train dense-x2-ft600 configs/dense-x2-ft.toml && evaluate dense-x2-ft600  # dense control, same budget
for s in 75 90; do
    train magnitude-x2-long-s$s configs/magnitude-x2.toml --set model.init=runs/dense-x2-long/model.safetensors \
        --set prune.sparsity=0.$s && evaluate magnitude-x2-long-s$s
done
wait
