#!/usr/bin/env bash
# Debian packages the demo and the tests need. Idempotent; skips apt when all are present.
#   install-deps.sh          build + host tests (FUSE+loop, nginx, mkfs tools, docker-registry
#                            and htpasswd for the registry tests) + the images
#                            (umoci, skopeo, busybox and kmod for the node image)
#   install-deps.sh vm       also the ublk VM harness: qemu, busybox, and bookworm-backports
#                            (whose linux-image-6.12 has ublk_drv); qemu-img and qemu-io for the
#                            qcow2 tests
#   install-deps.sh bench    also the benchmark peers (qemu-storage-daemon's curl driver, nbdkit)
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PKGS=(nginx e2fsprogs erofs-utils squashfs-tools fuse3 util-linux curl python3 libclang-dev umoci skopeo busybox-static kmod binutils docker-registry apache2-utils python3-venv)
BACKPORTS=()
need_backports=false
for group in "$@"; do
    case $group in
        # qemu-utils: qemu-img and qemu-io make the qcow2 images the tests read.
        vm) PKGS+=(busybox-static cpio xz-utils kmod fio iproute2); BACKPORTS+=(qemu-system-x86 qemu-utils); need_backports=true ;;
        bench) PKGS+=(nbdkit libnbd-bin fio iproute2); BACKPORTS+=(qemu-block-extra qemu-utils); need_backports=true ;;
        *) echo "install-deps: unknown group $group (expected vm or bench)" >&2; exit 2 ;;
    esac
done

if $need_backports && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "install-deps: adding Debian's bookworm-backports to apt's sources (/etc/apt/sources.list.d/bookworm-backports.sources; it stays) for ${BACKPORTS[*]}"
    cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq
fi
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
bp_missing=()
for p in "${BACKPORTS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || bp_missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ] || [ ${#bp_missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]} ${bp_missing[*]}"
    apt-get update -qq
    # docker-registry is for the tests, which start their own on 127.0.0.1: the package's
    # service (on :5000, every interface) must never start.
    if command -v systemctl >/dev/null 2>&1; then systemctl mask docker-registry.service >/dev/null 2>&1 || true; fi
    [ ${#missing[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # qemu comes from backports so it matches the machine's backports qemu-utils.
    [ ${#bp_missing[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends -t bookworm-backports "${bp_missing[@]}" >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
