#!/usr/bin/env bash
# Installs what the tests need, then runs every test CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh vm
cargo test --workspace
# The ublk tests need a kernel with ublk: they run in a VM (Debian's 6.12 kernel under qemu).
bash tests/e2e/vm/run.sh
