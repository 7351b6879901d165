#!/usr/bin/env bash
# Builds the container images of the node plugin and the controller, offline and without a
# container engine (umoci builds the OCI image, skopeo writes the archive), from this
# repository's binaries:
#   node:       lazy-image-csi-node, lazy-image-fd-holder, the libraries they link, and busybox's
#               sh plus kmod's modprobe for the chart's ublk_drv init container; runs as root.
#   controller: lazy-image-csi-controller and the libraries it links; runs as UID 65532.
# Each lands in target/images/<name>-<version>.tar, a docker-archive tagged as the chart's
# default values name it (`ctr images import`, `docker load`, `skopeo copy` take it).
#
#   bash scripts/images.sh          build both images
#   bash scripts/images.sh --test   build, then run each image's entrypoint from its unpacked
#                                   root filesystem (chroot, as the image's user): it starts and
#                                   prints its version; the controller's user is not root
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "images: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (unpacked images keep their owners)"
for t in umoci skopeo python3; do command -v "$t" >/dev/null || die "$t is missing (bash scripts/install-deps.sh)"; done
test_after=false
[ "${1:-}" = --test ] && test_after=true

REGISTRY=${LAZY_IMAGE_REGISTRY:-ghcr.io/lazy-image}
VERSION=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "lazy-image-csi-node"))')
ARCH=$(dpkg --print-architecture)
# The binaries the test build makes (the same profile and features: after `cargo test
# --workspace` this builds nothing).
cargo test -q --workspace --no-run 2>/dev/null
BIN=target/debug
OUT=target/images
rm -rf "$OUT" && mkdir -p "$OUT"

# Copies every shared library the programs after $1 link to the same path under $1.
libs_of() {
    local root=$1; shift
    local f lib
    for f in "$@"; do
        for lib in $(ldd "$f" | grep -o '/[^ ]*'); do
            # 0755: the dynamic loader among them is exec()ed by the kernel.
            [ -e "$root$lib" ] || install -D -m0755 "$(readlink -f "$lib")" "$root$lib"
        done
    done
}

# build NAME USER ENTRYPOINT: a fresh image whose root filesystem `populate_NAME` fills.
build() {
    local name=$1 user=$2 entry=$3
    local layout=$OUT/$name-layout bundle=$OUT/$name-bundle ref="$REGISTRY/$name:$VERSION"
    umoci init --layout "$layout"
    umoci new --image "$layout:$VERSION"
    umoci unpack --image "$layout:$VERSION" "$bundle" >/dev/null
    "populate_${name//-/_}" "$bundle/rootfs"
    umoci repack --image "$layout:$VERSION" "$bundle"
    umoci config --image "$layout:$VERSION" --os linux --architecture "$ARCH" \
        --config.entrypoint "$entry" --config.user "$user" --config.workingdir / \
        --config.label "org.opencontainers.image.version=$VERSION" \
        --config.label "org.opencontainers.image.title=$name"
    skopeo --insecure-policy copy -q "oci:$layout:$VERSION" "docker-archive:$OUT/$name-$VERSION.tar:$ref"
    rm -rf "$bundle"
    echo "images: $ref -> $OUT/$name-$VERSION.tar ($(du -h "$OUT/$name-$VERSION.tar" | cut -f1))"
}

populate_lazy_image_csi_node() {
    local root=$1
    mkdir -p "$root/usr/local/bin" "$root/usr/bin" "$root/bin" "$root/sbin" "$root/tmp"
    # Debug line tables stay in target/: they are most of the binaries' size.
    install -s -m0755 "$BIN/lazy-image-csi-node" "$BIN/lazy-image-fd-holder" "$root/usr/local/bin/"
    libs_of "$root" "$BIN/lazy-image-csi-node" "$BIN/lazy-image-fd-holder"
    # The init container's shell and module loader (kmod reads the host's compressed modules).
    install -m0755 /bin/busybox "$root/bin/busybox"
    ln -s busybox "$root/bin/sh"
    install -m0755 /usr/bin/kmod "$root/usr/bin/kmod"
    libs_of "$root" /usr/bin/kmod
    ln -s /usr/bin/kmod "$root/sbin/modprobe"
    ln -s /usr/bin/kmod "$root/bin/modprobe"
}

populate_lazy_image_csi_controller() {
    local root=$1
    mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/etc"
    install -s -m0755 "$BIN/lazy-image-csi-controller" "$root/usr/local/bin/"
    libs_of "$root" "$BIN/lazy-image-csi-controller"
    echo "nonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin" >"$root/etc/passwd"
    echo "nonroot:x:65532:" >"$root/etc/group"
}

build lazy-image-csi-node 0:0 /usr/local/bin/lazy-image-csi-node
build lazy-image-csi-controller 65532:65532 /usr/local/bin/lazy-image-csi-controller

$test_after || exit 0

# Each image as a runtime would see it: imported from its archive, unpacked, its entrypoint run
# as its user in its own root filesystem.
check() {
    local name=$1; shift
    local dir
    # Under target/: /tmp may be mounted noexec.
    dir=$(mktemp -d "$OUT/check.XXXXXX")
    skopeo --insecure-policy copy -q "docker-archive:$OUT/$name-$VERSION.tar" "oci:$dir/layout:t"
    umoci unpack --image "$dir/layout:t" "$dir/bundle" >/dev/null
    local cfg=$dir/bundle/config.json
    local uid gid entry
    uid=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["process"]["user"]["uid"])' "$cfg")
    gid=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["process"]["user"]["gid"])' "$cfg")
    entry=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["process"]["args"][0])' "$cfg")
    local out
    out=$(chroot --userspec="$uid:$gid" "$dir/bundle/rootfs" "$entry" --version) || die "$name: $entry --version failed"
    case $out in *"$VERSION"*) ;; *) die "$name: $entry --version printed '$out', not $VERSION" ;; esac
    echo "images: $name: '$out' as uid $uid"
    "check_${name//-/_}" "$dir/bundle/rootfs" "$uid"
    rm -rf "$dir"
}

check_lazy_image_csi_node() {
    local root=$1
    chroot "$root" /usr/local/bin/lazy-image-fd-holder --version >/dev/null || die "node image: the fd holder does not start"
    chroot "$root" /bin/sh -c '/sbin/modprobe --version' >/dev/null || die "node image: no modprobe for the init container"
    echo "images: lazy-image-csi-node: the fd holder and the init container's sh + modprobe run"
}

check_lazy_image_csi_controller() {
    [ "$2" != 0 ] || die "controller image runs as root"
    echo "images: lazy-image-csi-controller: runs as non-root (uid $2)"
}

check lazy-image-csi-node
check lazy-image-csi-controller
echo "images: both images build and start"
