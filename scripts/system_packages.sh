#!/usr/bin/env bash
# Installs the system packages that exporting a build as an OCI image needs
# (workers/oci.py): buildah builds the image, skopeo inspects it in the tests.
#
# Debian/Ubuntu, best effort: without root, without apt-get, or when the install
# fails, it warns on stderr and exits 0; the OCI export tests then skip.
set -euo pipefail

packages=(buildah skopeo)  # each package installs the command of the same name

warn() { echo "system_packages.sh: warning: $*" >&2; }

missing=()
for tool in "${packages[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "system_packages.sh: ${packages[*]} already installed"
  exit 0
fi

skipping="the OCI export tests will skip"
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
