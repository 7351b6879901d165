#!/usr/bin/env bash
# The local demo: build, make an ext4 image, serve it on 127.0.0.1, mount it lazily, list and
# read it, and show how few bytes came from the origin. Needs root (loop devices, mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --bin lazy-image
BIN=$PWD/target/debug/lazy-image

WORK=$(mktemp -d /tmp/lazy-image-demo.XXXXXX)
SERVE_PID=
cleanup() {
    "$BIN" umount "$WORK/mnt" --run-dir "$WORK/run" 2>/dev/null || true
    [ -n "$SERVE_PID" ] && kill "$SERVE_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "== making a 512 MiB ext4 image with a few files"
mkdir -p "$WORK/tree/models" "$WORK/srv" "$WORK/mnt"
head -c 300M /dev/urandom >"$WORK/tree/models/weights.bin"
seq 1 100000 >"$WORK/tree/models/vocab.txt"
echo "hello from a lazily fetched image" >"$WORK/tree/README.txt"
mkfs.ext4 -q -F -d "$WORK/tree" "$WORK/srv/demo.img" 512M
IMAGE_SIZE=$(stat -c %s "$WORK/srv/demo.img")

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN" serve "$WORK/srv" --listen "127.0.0.1:$PORT" 2>"$WORK/serve.log" &
SERVE_PID=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done

echo "== mounting http://127.0.0.1:$PORT/demo.img at $WORK/mnt"
"$BIN" mount "http://127.0.0.1:$PORT/demo.img" "$WORK/mnt" --cache-dir "$WORK/cache" --run-dir "$WORK/run" &
for _ in $(seq 300); do mountpoint -q "$WORK/mnt" && break; sleep 0.05; done
mountpoint -q "$WORK/mnt" || { echo "demo: the mount did not come up" >&2; exit 1; }

echo "== ls -lR"
ls -lR "$WORK/mnt"
echo "== cat README.txt"
cat "$WORK/mnt/README.txt"
echo "== tail -n 3 models/vocab.txt"
tail -n 3 "$WORK/mnt/models/vocab.txt"
cmp "$WORK/mnt/models/vocab.txt" "$WORK/tree/models/vocab.txt" && echo "vocab.txt matches the source"

"$BIN" umount "$WORK/mnt" --run-dir "$WORK/run"
echo "== what the cache holds after reading a few files (a next mount would reuse it; the demo removes it at exit)"
"$BIN" stat --cache-dir "$WORK/cache"
ORIGIN=$("$BIN" stat --json --cache-dir "$WORK/cache" | python3 -c 'import json,sys; print(sum(i["stats"]["origin_bytes"] for i in json.load(sys.stdin)))')
python3 - "$ORIGIN" "$IMAGE_SIZE" <<'EOF'
import sys
o, n = int(sys.argv[1]), int(sys.argv[2])
print(f"== fetched {o/2**20:.1f} MiB from the origin for a {n/2**20:.0f} MiB image ({100*o/n:.2f}%)")
EOF
