#!/usr/bin/env bash
# Install the inference engines `sparsesr bench --peers` and bench/test_bench_peers.py compare against:
# ONNX Runtime, OpenVINO and DeepSparse 1.8.0, into the active Python environment.
#
#   tools/install_peers.sh
#
# DeepSparse: 1.9.0 on PyPI is an sdist that does not build, so the 1.8.0 wheel (and the wheel of its
# sparsezoo) are fetched and installed. Their pins move numpy below 2 and onnx to 1.14, which
# torch 2.13 and onnxruntime accept; use a separate virtual environment if something else of yours
# needs numpy 2 or a newer onnx. sparsesr exports ONNX with the TorchScript exporter (opset 17),
# which needs neither onnxscript nor a new onnx.
set -euo pipefail
python -m pip install -q "onnxruntime" "openvino"
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "deepsparse==1.8.0" "sparsezoo==1.8.0"
python -m pip install -q "$wheels"/sparsezoo-1.8.0-*.whl
python -m pip install -q --no-deps "$wheels"/deepsparse-1.8.0-*.whl
python -m pip install -q "py-machineid" "geocoder"  # imported by sparsezoo at start-up, not declared by the wheel
NM_DISABLE_ANALYTICS=1 python -c "import onnxruntime, openvino, deepsparse; print('peers installed:', onnxruntime.__version__, openvino.__version__, deepsparse.__version__)"
