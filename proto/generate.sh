#!/usr/bin/env bash
# Regenerate kvlayer/rpc/_gen from proto/kvlayer.proto (checked in; never edit by hand).
# Usage: [PYTHON=python3] proto/generate.sh [OUT_ROOT]   (OUT_ROOT defaults to the repository root; the test
# tests/integration/test_server_proto.py generates into a temp dir and compares).
# The -I mapping makes the generated grpc module import "kvlayer.rpc._gen.kvlayer_pb2".
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo}"
mkdir -p "$out/kvlayer/rpc/_gen"
cd "$repo"
"${PYTHON:-python}" -m grpc_tools.protoc \
  -Ikvlayer/rpc/_gen=proto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  kvlayer/rpc/_gen/kvlayer.proto
