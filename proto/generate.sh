#!/usr/bin/env bash
# Regenerate kvlayer/server/_gen from proto/kvlayer.proto (checked in; never edit by hand).
# Usage: proto/generate.sh [OUT_ROOT]   (OUT_ROOT defaults to the repository root; the test
# tests/test_server_proto.py generates into a temp dir and compares).
# The -I mapping makes the generated grpc module import "kvlayer.server._gen.kvlayer_pb2".
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo}"
mkdir -p "$out/kvlayer/server/_gen"
cd "$repo"
python -m grpc_tools.protoc \
  -Ikvlayer/server/_gen=proto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  kvlayer/server/_gen/kvlayer.proto
