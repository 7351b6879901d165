#!/usr/bin/env bash
# fio through our ublk device (warm cache) beside the kernel loop driver on the same cache file
# and rublk's loop target on it, in the test VM (this host has no ublk). TCG makes absolute
# numbers meaningless: read the ratios, all measured in one boot. Then random writes through a
# writable mount against a plain loop device on a local sparse copy of the image.
#   bash bench/ublk-vm.sh            (needs `cargo install rublk` for the rublk column)
#   LAZY_IMAGE_BENCH_BEFORE=target/bench-before/lazy-image bash bench/ublk-vm.sh
#                                    (also another build of ours, e.g. the one before a change;
#                                    it must be under the repository, which the VM sees)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --bin lazy-image
RUBLK=$(command -v rublk || true)
LAZY_IMAGE_BENCH_BEFORE=${LAZY_IMAGE_BENCH_BEFORE:+$PWD/$LAZY_IMAGE_BENCH_BEFORE} LAZY_IMAGE_BENCH_RUBLK=$RUBLK LAZY_IMAGE_VM_TIMEOUT=1800 bash tests/e2e/vm/run.sh bash bench/ublk-guest.sh
