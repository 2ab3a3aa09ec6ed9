#!/usr/bin/env bash
# The x4 models of docs/results.md: started from an x2 dense parent (tools/reproduce_x2.sh makes
# runs/dense-x2; the longer one is kept in checkpoints/) and pruned with dup to 75% while they learn x4;
# then bicubic and the models on Set5, Set14, BSD100.
#
#   tools/reproduce_x4.sh            # one torch thread; finished steps are skipped
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/runs.sh

bicubic 4
train dup-x4-s75 configs/dup-x4.toml && evaluate dup-x4-s75
# From the longer x2 parent (kept in checkpoints/), 1800 steps (~1 h alone on a core).
train dup-x4-long-s75 configs/dup-x4-long.toml && evaluate dup-x4-long-s75
# The same at 85 % (the shipped x4).
train dup-x4-long-s85 configs/dup-x4-long.toml --set prune.sparsity=0.85 && evaluate dup-x4-long-s85
