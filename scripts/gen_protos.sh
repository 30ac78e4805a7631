#!/usr/bin/env bash
# Generates every language's code from protos/ with buf.gen.yaml: Python into
# src/modellifecycle, TypeScript into clients/typescript/src/gen, Go into
# clients/go/src/modellifecycle/v1. With an argument DIR, writes under DIR instead
# (the staleness check). google/rpc types come from each language's own package
# (googleapis-common-protos, genproto) except in TypeScript, which gets them generated.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
[ -x clients/typescript/node_modules/.bin/protoc-gen-es ] ||
  missing+=("protoc-gen-es (cd clients/typescript && npm ci)")
command -v protoc-gen-go >/dev/null || missing+=("protoc-gen-go (Debian package protoc-gen-go)")
command -v protoc-gen-go-grpc >/dev/null ||
  missing+=("protoc-gen-go-grpc (Debian package protoc-gen-go-grpc)")
if [ "${#missing[@]}" -ne 0 ]; then
  printf 'gen_protos.sh: missing plugin: %s\n' "${missing[@]}" >&2
  echo "gen_protos.sh: 'make setup' installs them all" >&2
  exit 1
fi

out="${1:-.}"
if [ "$out" = . ]; then
  # Generated trees are replaced whole, so a file whose .proto is gone goes too.
  rm -rf src/modellifecycle/v1 clients/typescript/src/gen clients/go/src/modellifecycle/v1
fi
buf generate --template buf.gen.yaml --output "$out"
# google.rpc is generated for TypeScript only; Python and Go import the published
# packages (two copies of one .proto in a process would clash when registered).
rm -rf "$out/src/google" "$out/clients/go/src/google.golang.org"
: > "$out/src/modellifecycle/__init__.py"
: > "$out/src/modellifecycle/v1/__init__.py"
: > "$out/src/modellifecycle/py.typed"
