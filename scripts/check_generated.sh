#!/usr/bin/env bash
# Fails when src/modellifecycle is not what protos/ generates (someone edited a .proto
# and forgot `make generate`, or edited generated code by hand).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
scripts/gen_protos.sh "$tmp" >/dev/null
if ! diff -r -x __pycache__ "$tmp/modellifecycle" src/modellifecycle; then
  echo "generated code is stale: run 'make generate' and commit the result" >&2
  exit 1
fi
echo "generated code is up to date"
