#!/usr/bin/env bash
# Installs what the tests need, then runs every test CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh vm
# FUSE over io_uring (kernel 6.14+) is offered only when the fuse module's enable_uring is set:
# set it so the FUSE tests cover that transport (the fuse-dev tests keep /dev/fuse covered), and
# put it back as it was when the tests end.
uring=/sys/module/fuse/parameters/enable_uring
if [ -w "$uring" ] && [ "$(cat "$uring")" != Y ]; then
    was=$(cat "$uring")
    echo "test.sh: turning on $uring for the FUSE-over-io_uring tests (set back to $was at exit)"
    echo Y > "$uring"
    trap 'echo "$was" > "$uring"' EXIT
fi
# Style and lints first (rustfmt.toml; the workspace lints in Cargo.toml, warnings denied).
rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --check
cargo clippy -q --workspace --all-targets -- -D warnings
# oras (PyPI) publishes the registry tests' single-blob artifact, as users push models and data;
# pinned, in a venv under target/ (the VM's tests find it there too).
venv=target/registry-venv
if ! "$venv/bin/python" -c "import oras.client" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check oras==0.2.43
fi
cargo test --workspace
# The Helm chart, rendered and checked offline; the images it names, built and started.
bash scripts/chart-check.sh
bash scripts/images.sh --test
# The ublk tests need a kernel with ublk: they run in a VM (Debian's 6.12 kernel under qemu).
bash tests/e2e/vm/run.sh
