#!/usr/bin/env bash
# Regenerates the committed gRPC stubs of the Python client from proto/.
#
#   python-client/scripts/gen_proto.sh [OUT_DIR]
#
# OUT_DIR defaults to python-client/cairn/_proto. Needs grpcio-tools (the
# version scripts/test-python pins, so the output matches the committed
# files byte for byte). The generated modules import each other as
# `cairn.v1...`, which would collide with the `cairn` package itself, so the
# imports are rewritten to `cairn._proto.cairn.v1...`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-$repo/python-client/cairn/_proto}"
python="${PYTHON:-python3}"

mkdir -p "$out/cairn/v1"
"$python" -m grpc_tools.protoc \
  --proto_path="$repo/proto" \
  --python_out="$out" \
  --pyi_out="$out" \
  --grpc_python_out="$out" \
  "$repo/proto/cairn/v1/cairn.proto"

sed -i 's/^from cairn\.v1 import /from cairn._proto.cairn.v1 import /' \
  "$out/cairn/v1/cairn_pb2_grpc.py"
for pkg in "$out" "$out/cairn" "$out/cairn/v1"; do
  : >"$pkg/__init__.py"
done
