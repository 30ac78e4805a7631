#!/usr/bin/env bash
# Installs the Debian packages the project needs beyond Python:
#   buildah, skopeo        export a build as an OCI image (workers/oci.py; tests inspect it)
#   golang-go and Debian's Go protobuf/gRPC packages
#                          build and run the Go client (clients/go, GOPATH mode: there is
#                          no Go module proxy here) and generate its code (make generate);
#                          golang/protobuf 1.5 replaces Debian's default 1.3, which predates
#                          the generated code and makes gRPC's codec panic
#   chromium, fonts-dejavu-core
#                          the web console's browser tests (tests/browser: Playwright for
#                          Python drives /usr/bin/chromium; Playwright's own browser
#                          download is not used) and the screenshots in docs/console/
#
# Debian/Ubuntu, best effort: without root, without apt-get, or when the install
# fails, it warns on stderr and exits 0; the tests that need a missing tool then skip
# (make check-generated, which needs the Go plugins, says what is missing).
set -euo pipefail

packages=(
  buildah skopeo
  golang-go protoc-gen-go protoc-gen-go-grpc
  golang-google-protobuf-dev golang-google-grpc-dev golang-google-genproto-dev
  golang-github-golang-protobuf-1-5-dev
  chromium fonts-dejavu-core
)

warn() { echo "system_packages.sh: warning: $*" >&2; }

installed() { dpkg-query -W -f '${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for pkg in "${packages[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "system_packages.sh: ${packages[*]} already installed"
  exit 0
fi

skipping="the tests that need them will skip, which fails make test unless CP_NO_SKIPS=0"
if [ "$(id -u)" -ne 0 ]; then
  warn "not root: cannot install ${missing[*]}; $skipping" \
    "(as root: apt-get install -y --no-install-recommends ${missing[*]})"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  warn "apt-get not found: install ${missing[*]} with this system's package manager; $skipping"
  exit 0
fi

install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

echo "system_packages.sh: installing ${missing[*]}"
if install; then
  exit 0
fi
echo "system_packages.sh: install failed; refreshing the package lists and trying again" >&2
if DEBIAN_FRONTEND=noninteractive apt-get update && install; then
  exit 0
fi
warn "could not install ${missing[*]}; $skipping"
exit 0
