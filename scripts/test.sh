#!/usr/bin/env bash
# Installs what the tests need, then runs every test CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo test --workspace
