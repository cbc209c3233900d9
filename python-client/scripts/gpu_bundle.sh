#!/usr/bin/env bash
# Prepares python-client/.device/ (ignored) for running tests/gpu_check.py on
# a GPU machine that has PyTorch but no network: a stripped cairnd, and
# Python 3.12 wheels of the client's gRPC dependencies, which such images
# may lack at the versions the committed stubs need.
#
#   python-client/scripts/gpu_bundle.sh [CAIRND_BIN]
#
# Then, on the GPU machine, with python-client/.device carried along:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site python-client/.device/*.whl \
#     && PYTHONPATH=/tmp/site:$PWD/python-client CAIRND_BIN=python-client/.device/cairnd \
#        python3 python-client/tests/gpu_check.py
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="$repo/python-client/.device"
bin="${1:-$repo/target/debug/cairnd}"
rm -rf "$out"
mkdir -p "$out"
cp "$bin" "$out/cairnd"
strip "$out/cairnd"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$out" "grpcio==1.85.1" "protobuf==7.36.2"
du -sh "$out"
