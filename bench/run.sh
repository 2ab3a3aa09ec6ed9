#!/usr/bin/env bash
# The benchmark in one command: run the suites, then write bench/results/<machine>-<date>.{json,md,png}.
#
#   bench/run.sh            standard set, a few minutes on 2 cores
#   bench/run.sh --full     every layer / model / sparsity / size (long: EDSR at 256x256 takes hours on 2 cores)
#
# Environment: SPARSESR_BENCH_THREADS (default 2), SPARSESR_BENCH_ROUNDS (default 5), MACHINE (name in the
# file names; default: the host name). Run it on a quiet machine: other load skews dense and sparse differently
# (docs/performance.md). The peer engines (ONNX Runtime, OpenVINO, DeepSparse) are timed when installed
# (tools/install_peers.sh); missing ones are listed as skipped. The CPU kernel's dispatch is re-measured in this run, not read from ~/.cache.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--full" ]]; then
    export SPARSESR_BENCH_FULL=1
    shift
fi
export SPARSESR_BENCH_THREADS="${SPARSESR_BENCH_THREADS:-2}"
export SPARSESR_CPU_DISPATCH_CACHE=0
machine="${MACHINE:-$(hostname -s 2>/dev/null || echo machine)}"
raw="bench/results/raw-${machine}-$(date +%Y-%m-%d).json"
mkdir -p bench/results

python -m pytest bench/test_bench_layers.py bench/test_bench_model.py bench/test_bench_size.py \
    bench/test_bench_memory.py bench/test_bench_peers.py --benchmark-only --benchmark-json="$raw" --benchmark-columns=median,rounds \
    --benchmark-sort=name -rs -q -p no:cacheprovider "$@"
python bench/report.py "$raw" --machine "$machine" --readme README.md --readme docs/performance.md
