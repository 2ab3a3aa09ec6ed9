#!/usr/bin/env bash
# The x4 models of docs/results.md: started from an x2 dense parent (tools/reproduce_x2.sh makes
# runs/dense-x2; the longer one is kept in checkpoints/) and pruned with dup to 75% while they learn x4;
# then bicubic and the models on Set5, Set14, BSD100.
#
#   tools/reproduce_x4.sh            # one torch thread; finished steps are skipped
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data
SETS=("$DATA/val/Set5" "$DATA/test/Set14" "$DATA/test/BSD100")
export OMP_NUM_THREADS=1
mkdir -p runs/bicubic-x4

[ -f runs/bicubic-x4/eval.json ] || { sparsesr eval -q --json --model bicubic --scale 4 --data "${SETS[@]}" \
    > runs/bicubic-x4/eval.json.tmp && mv runs/bicubic-x4/eval.json.tmp runs/bicubic-x4/eval.json; }
[ -f runs/dup-x4-s75/model.safetensors ] || sparsesr train -q -c configs/dup-x4.toml -o runs/dup-x4-s75 \
    --set train.threads=1 > runs/dup-x4-s75.log 2>&1
[ -f runs/dup-x4-s75/eval.json ] || {
    sparsesr eval -q --json --model runs/dup-x4-s75/model.safetensors --data "${SETS[@]}" > runs/dup-x4-s75/eval.json.tmp
    mv runs/dup-x4-s75/eval.json.tmp runs/dup-x4-s75/eval.json
}
# The shipped x4: from the longer x2 parent (kept in checkpoints/), 1800 steps (~1 h alone on a core).
[ -f runs/dup-x4-long-s75/model.safetensors ] || sparsesr train -q -c configs/dup-x4-long.toml \
    -o runs/dup-x4-long-s75 --set train.threads=1 > runs/dup-x4-long-s75.log 2>&1
[ -f runs/dup-x4-long-s75/eval.json ] || {
    sparsesr eval -q --json --model runs/dup-x4-long-s75/model.safetensors --data "${SETS[@]}" \
        > runs/dup-x4-long-s75/eval.json.tmp
    mv runs/dup-x4-long-s75/eval.json.tmp runs/dup-x4-long-s75/eval.json
}
# The same at 85 % (the shipped x4).
[ -f runs/dup-x4-long-s85/model.safetensors ] || sparsesr train -q -c configs/dup-x4-long.toml \
    -o runs/dup-x4-long-s85 --set train.threads=1 --set prune.sparsity=0.85 > runs/dup-x4-long-s85.log 2>&1
[ -f runs/dup-x4-long-s85/eval.json ] || {
    sparsesr eval -q --json --model runs/dup-x4-long-s85/model.safetensors --data "${SETS[@]}" \
        > runs/dup-x4-long-s85/eval.json.tmp
    mv runs/dup-x4-long-s85/eval.json.tmp runs/dup-x4-long-s85/eval.json
}
