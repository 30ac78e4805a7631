#!/usr/bin/env bash
# Fails when the committed generated code (Python, TypeScript, Go) is not what
# buf.gen.yaml makes of protos/: someone edited a .proto and forgot `make generate`,
# or edited generated code by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
scripts/gen_protos.sh "$tmp" >/dev/null
stale=0
for tree in src/modellifecycle clients/typescript/src/gen clients/go/src/modellifecycle/v1; do
  if ! diff -r -x __pycache__ "$tmp/$tree" "$tree"; then
    echo "generated code is stale: $tree" >&2
    stale=1
  fi
done
if [ "$stale" -ne 0 ]; then
  echo "run 'make generate' and commit the result" >&2
  exit 1
fi
echo "generated code is up to date (Python, TypeScript, Go)"
