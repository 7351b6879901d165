#!/usr/bin/env bash
# Boots a throwaway VM that has ublk, and runs a command in it against this machine's files.
#
#   bash tests/e2e/vm/run.sh [COMMAND ...]     (default: bash tests/e2e/vm/guest-tests.sh)
#
# The host kernel here has no ublk, so the guest runs Debian bookworm-backports' 6.12 kernel
# (ublk_drv is a module there) under qemu TCG. A busybox initramfs loads the modules, mounts the
# host's root read-only over 9p with a tmpfs overlay on top (a writable root that forgets
# everything at power-off), and runs COMMAND from this repository's directory. The guest writes
# its exit status and output to a second 9p share, because qemu's own exit code cannot carry it.
# Everything needed is installed here (apt) on first use and cached in $LAZY_IMAGE_VM_CACHE.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
CACHE=${LAZY_IMAGE_VM_CACHE:-/var/cache/lazy-image-vm}
MEM=${LAZY_IMAGE_VM_MEM:-4G}
TIMEOUT=${LAZY_IMAGE_VM_TIMEOUT:-2400}
die() { echo "vm: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (installs packages, shares / into the guest)"
bash "$REPO/scripts/install-deps.sh" vm

mkdir -p "$CACHE"
# The kernel: the newest 6.12 image from bookworm-backports, unpacked (not installed) here.
if [ ! -e "$CACHE/kernel/ok" ]; then
    pkg=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6\.12/{print $2; exit}')
    [ -n "$pkg" ] || die "no linux-image-6.12*-amd64 package in the apt sources (bookworm-backports missing?)"
    rm -rf "$CACHE/kernel" && mkdir -p "$CACHE/kernel"
    (cd "$CACHE/kernel" && apt-get download -q "$pkg" >/dev/null 2>&1) || die "cannot download $pkg"
    dpkg-deb -x "$CACHE"/kernel/*.deb "$CACHE/kernel/root" || die "cannot unpack $pkg"
    rm -f "$CACHE"/kernel/*.deb
    kver=$(ls "$CACHE/kernel/root/lib/modules")
    depmod -b "$CACHE/kernel/root" "$kver"
    echo "$kver" >"$CACHE/kernel/ok"
fi
KVER=$(cat "$CACHE/kernel/ok")
KROOT=$CACHE/kernel/root
[ -e "$KROOT/lib/modules/$KVER/kernel/drivers/block/ublk_drv.ko.xz" ] || die "kernel $KVER has no ublk_drv module"

# The initramfs: busybox, our init, and the modules (decompressed: busybox insmod reads plain .ko).
INITRD=$CACHE/initramfs-$KVER.cpio.gz
if [ ! -e "$INITRD" ] || [ "$HERE/init.sh" -nt "$INITRD" ]; then
    stage=$(mktemp -d)
    mkdir -p "$stage"/{bin,dev,proc,sys,host,rw,newroot,modules}
    cp /bin/busybox "$stage/bin/busybox"
    for a in sh mount mkdir insmod chroot poweroff cat echo sleep ln switch_root umount; do ln -s busybox "$stage/bin/$a"; done
    : >"$stage/modules/order"
    for m in 9pnet_virtio 9p overlay ublk_drv loop ext4 erofs squashfs; do
        modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        name=$(basename "$ko" .ko.xz)
        xz -dc "$ko" >"$stage/modules/$name.ko"
        echo "$name" >>"$stage/modules/order"
    done
    cp "$HERE/init.sh" "$stage/init"
    chmod +x "$stage/init"
    (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    rm -rf "$stage"
fi

RESULTS=$(mktemp -d /tmp/lazy-image-vm.XXXXXX)
trap 'rm -rf "$RESULTS"' EXIT
if [ $# -eq 0 ]; then
    # The VM test binaries, built on the host with the same profile as every other test (so
    # nothing is rebuilt), run in the guest from the shared root.
    tests=$(cd "$REPO" && cargo test --workspace --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("e2e_ublk", "csi_node"):
        print(m["executable"])')
    [ -n "$tests" ] || die "no VM test binaries were built (cargo test --no-run failed?)"
    # shellcheck disable=SC2086
    set -- sh tests/e2e/vm/guest-tests.sh $tests
fi
# The command travels as a file on the results share: no quoting through the kernel command line.
printf '%q ' "$@" >"$RESULTS/command"
printf 'cd %q\n' "$REPO" >"$RESULTS/cwd"
env | grep -E '^(CI|RUST_LOG|LAZY_IMAGE_[A-Z_]*|RUST_BACKTRACE)=' | sed 's/^/export /' >"$RESULTS/env" || true

echo "vm: booting $KVER (TCG) to run: $*" >&2
start=$(date +%s)
# TCG: KVM cannot boot a standard guest on these hosts. No network device: the guest has only lo.
timeout --foreground "$TIMEOUT" qemu-system-x86_64 \
    -machine q35 -accel tcg,thread=multi -cpu max -smp "$(nproc)" -m "$MEM" \
    -kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$INITRD" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$RESULTS",mount_tag=results,security_model=none \
    -nic none -display none -serial stdio -no-reboot </dev/null \
    | sed -u 's/^/  guest: /' || true
echo "vm: guest ran $(( $(date +%s) - start )) s" >&2
if [ -s "$RESULTS/results.txt" ]; then
    echo "vm: measured in the guest:" >&2
    sed 's/^/  /' "$RESULTS/results.txt" >&2
fi
[ -e "$RESULTS/exit" ] || die "the guest did not report an exit status (boot failure or timeout after ${TIMEOUT}s)"
code=$(cat "$RESULTS/exit")
[ "$code" = 0 ] || die "the command failed in the guest (exit $code)"
echo "vm: the command passed in the guest" >&2
