#!/usr/bin/env bash
# Installs what the tests need, then runs every test CI runs.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq && apt-get install -y -qq nginx e2fsprogs erofs-utils squashfs-tools fuse3 util-linux >/dev/null
cargo test --workspace
