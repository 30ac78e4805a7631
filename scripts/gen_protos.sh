#!/usr/bin/env bash
# Generates the Python code of protos/modellifecycle/v1 into src/modellifecycle/v1
# (or into $1, for the staleness check). google/rpc types come from the
# googleapis-common-protos wheel at run time; they are vendored only to compile.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-src}"
mkdir -p "$out/modellifecycle/v1"
python -m grpc_tools.protoc -I protos \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/modellifecycle/v1/*.proto
: > "$out/modellifecycle/__init__.py"
: > "$out/modellifecycle/v1/__init__.py"
: > "$out/modellifecycle/py.typed"
