#!/usr/bin/env bash
# Debian packages the demo and the host tests need. Idempotent; skips apt when all are present.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PKGS=(nginx e2fsprogs erofs-utils squashfs-tools fuse3 util-linux curl python3)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
