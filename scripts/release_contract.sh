#!/usr/bin/env bash
# Writes protos/release/v1.binpb, the image `buf breaking` checks every change against
# (make contract), from the contract as it was at a released commit:
#   scripts/release_contract.sh <commit>     e.g. the commit a release landed at
# Run it when a release lands, so its RPCs and fields are guarded from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: scripts/release_contract.sh <commit>}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$rev" buf.yaml protos/modellifecycle protos/google | tar -x -C "$tmp"
PATH="$PWD/.venv/bin:$PATH" buf build "$tmp" -o "$PWD/protos/release/v1.binpb"
echo "protos/release/v1.binpb: the contract at $(git rev-parse --short "$rev")"
