#!/usr/bin/env bash
# Runs in the VM (see ublk-vm.sh). Prints one table of fio results and ratios.
set -euo pipefail
B=$PWD/target/debug/lazy-image
W=/tmp/ubench
RUNTIME=${LAZY_IMAGE_BENCH_RUNTIME:-8}
mkdir -p "$W/tree" "$W/srv" "$W/mnt"
head -c 200M /dev/urandom >"$W/tree/big.bin"
mkfs.ext4 -q -F -d "$W/tree" "$W/srv/b.img" 256M
"$B" serve "$W/srv" --listen 127.0.0.1:8080 2>/dev/null &
sleep 0.5
URL=http://127.0.0.1:8080/b.img
"$B" warm "$URL" --cache-dir "$W/cache" 2>/dev/null
"$B" mount "$URL" "$W/mnt" --backend ublk --cache-dir "$W/cache" --run-dir "$W/run" 2>"$W/mount.log" &
for _ in $(seq 200); do mountpoint -q "$W/mnt" && break; sleep 0.1; done
OURS=$(findmnt -no SOURCE "$W/mnt")
DATA=$(ls "$W"/cache/*/data)
LOOP=$(losetup --find --show --read-only "$DATA")
devs="ours=$OURS loop=$LOOP"
# Another build of ours (LAZY_IMAGE_BENCH_BEFORE, e.g. the one before a change) on its own
# cache, so both are measured in one boot.
if [ -n "${LAZY_IMAGE_BENCH_BEFORE:-}" ] && [ -x "$LAZY_IMAGE_BENCH_BEFORE" ]; then
    mkdir -p "$W/mnt2"
    "$LAZY_IMAGE_BENCH_BEFORE" warm "$URL" --cache-dir "$W/cache2" 2>/dev/null
    "$LAZY_IMAGE_BENCH_BEFORE" mount "$URL" "$W/mnt2" --backend ublk --cache-dir "$W/cache2" --run-dir "$W/run2" 2>"$W/mount2.log" &
    for _ in $(seq 200); do mountpoint -q "$W/mnt2" && break; sleep 0.1; done
    devs="$devs before=$(findmnt -no SOURCE "$W/mnt2")"
fi
if [ -n "${LAZY_IMAGE_BENCH_RUBLK:-}" ] && [ -x "$LAZY_IMAGE_BENCH_RUBLK" ]; then
    before=$(ls /dev | grep -c '^ublkb' || true)
    "$LAZY_IMAGE_BENCH_RUBLK" add loop -f "$DATA" --read-only >/dev/null 2>&1 || true
    for _ in $(seq 100); do [ "$(ls /dev | grep -c '^ublkb')" -gt "$before" ] && break; sleep 0.1; done
    RDEV=/dev/$(ls -t /dev | grep '^ublkb' | grep -v "$(basename "$OURS")" | grep -v "$(basename "$(findmnt -no SOURCE "$W/mnt2" 2>/dev/null || echo none)")" | head -1)
    [ -b "$RDEV" ] && devs="$devs rublk=$RDEV"
fi
echo "bench: devices $devs" >&2
run() { # name dev rw bs qd
    fio --name="$1" --filename="$2" --readonly --direct=1 --ioengine=io_uring --rw="$3" --bs="$4" \
        --iodepth="$5" --runtime="$RUNTIME" --time_based --size=200M --output-format=json 2>/dev/null \
        | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]["read"]; print(j["iops"], j["bw_bytes"])'
}
# One pass over each device first: its buffers and the page cache are warm for every column.
for d in $devs; do fio --name=warmup --filename="${d#*=}" --readonly --direct=1 --ioengine=io_uring --rw=read --bs=1M \
    --iodepth=4 --size=200M --output-format=json >/dev/null 2>&1; done
: >"$W/results"
# Two passes, the second in the reverse order: the device measured first runs a few percent
# apart from the others in this VM (an A/A run, the same build twice, showed it).
reversed=$(for d in $devs; do echo "$d"; done | tac | tr '\n' ' ')
for order in "$devs" "$reversed"; do
    for d in $order; do
        name=${d%%=*}; dev=${d#*=}
        echo "$name seq1m $(run "$name" "$dev" read 1M 4)" >>"$W/results"
        echo "$name rand4k_qd1 $(run "$name" "$dev" randread 4k 1)" >>"$W/results"
        echo "$name rand4k_qd32 $(run "$name" "$dev" randread 4k 32)" >>"$W/results"
    done
done
python3 - "$W/results" <<'PY'
import sys
passes = {}
for line in open(sys.argv[1]):
    dev, job, iops, bw = line.split()
    passes.setdefault((dev, job), []).append((float(iops), float(bw)))
# The mean of the two passes.
r = {k: (sum(p[0] for p in v) / len(v), sum(p[1] for p in v) / len(v)) for k, v in passes.items()}
devs = [d for d in ("ours", "before", "loop", "rublk") if (d, "seq1m") in r]
print("\nfio on a warm cache, in the TCG VM (absolute numbers are TCG's; compare the ratios); mean of two passes in opposite orders")
print(f"{'job':14}" + "".join(f"{d:>14}" for d in devs) + f"{'ours/loop':>12}" + (f"{'rublk/loop':>12}{'ours/rublk':>12}" if "rublk" in devs else "")
      + (f"{'ours/before':>12}" if "before" in devs else ""))
for job, unit in (("seq1m", "MiB/s"), ("rand4k_qd1", "IOPS"), ("rand4k_qd32", "IOPS")):
    val = lambda d: r[(d, job)][1] / 2**20 if unit == "MiB/s" else r[(d, job)][0]
    line = f"{job + ' ' + unit:14}" + "".join(f"{val(d):>14.0f}" for d in devs) + f"{val('ours') / val('loop'):>11.2f}x"
    if "rublk" in devs:
        line += f"{val('rublk') / val('loop'):>11.2f}x{val('ours') / val('rublk'):>11.2f}x"
    if "before" in devs:
        line += f"{val('ours') / val('before'):>11.2f}x"
    print(line)
PY
losetup -d "$LOOP"
# Only rublk's own device: `rublk del -a` would delete ours too.
case $devs in *rublk=*) "$LAZY_IMAGE_BENCH_RUBLK" del -n "${RDEV#/dev/ublkb}" >/dev/null 2>&1 || true ;; esac
"$B" umount "$W/mnt" --run-dir "$W/run" 2>/dev/null
if mountpoint -q "$W/mnt2" 2>/dev/null; then "$LAZY_IMAGE_BENCH_BEFORE" umount "$W/mnt2" --run-dir "$W/run2" 2>/dev/null; fi

# The writable layer over ublk against a plain loop device on a local sparse copy of the image:
# fio writes a new file at random (first writes), then the same blocks again (rewrites), in
# two passes in opposite orders. An image of 4 KiB blocks, as real ones are. With
# LAZY_IMAGE_BENCH_BEFORE, the other build's writable mount is measured in the same passes.
mkdir -p "$W/wtree" "$W/wmnt" "$W/lmnt"
head -c 16M /dev/urandom >"$W/wtree/old.bin"
mkfs.ext4 -q -F -b 4096 -d "$W/wtree" "$W/srv/w.img" 256M
WURL=http://127.0.0.1:8080/w.img
"$B" mount "$WURL" "$W/wmnt" --backend ublk --writable --cache-dir "$W/cache" --run-dir "$W/run" 2>"$W/wmount.log" &
for _ in $(seq 200); do mountpoint -q "$W/wmnt" && break; sleep 0.1; done
cp --sparse=always "$W/srv/w.img" "$W/local.img"
mount -o loop "$W/local.img" "$W/lmnt"
wdevs="ours=$W/wmnt loop=$W/lmnt"
if [ -n "${LAZY_IMAGE_BENCH_BEFORE:-}" ] && [ -x "$LAZY_IMAGE_BENCH_BEFORE" ]; then
    mkdir -p "$W/wmnt2"
    "$LAZY_IMAGE_BENCH_BEFORE" mount "$WURL" "$W/wmnt2" --backend ublk --writable --cache-dir "$W/cache2" --run-dir "$W/run2" 2>"$W/wmount2.log" &
    for _ in $(seq 200); do mountpoint -q "$W/wmnt2" && break; sleep 0.1; done
    wdevs="$wdevs before=$W/wmnt2"
fi
wjob() { # dir -> IOPS of one random write pass over dir/fio.dat
    fio --name=w --filename="$1/fio.dat" --rw=randwrite --bs=4k --size=96M --direct=1 --ioengine=io_uring \
        --iodepth=16 --end_fsync=1 --randrepeat=1 --output-format=json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["iops"])'
}
: >"$W/wresults"
for order in "$wdevs" "$(for d in $wdevs; do echo "$d"; done | tac | tr '\n' ' ')"; do
    for d in $order; do
        name=${d%%=*}; dir=${d#*=}
        echo "$name first $(wjob "$dir")" >>"$W/wresults"
        echo "$name rewrite $(wjob "$dir")" >>"$W/wresults"
        rm -f "$dir/fio.dat"; sync -f "$dir"; fstrim "$dir" 2>/dev/null || true
    done
done
python3 - "$W/wresults" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    dev, job, iops = line.split()
    r.setdefault((dev, job), []).append(float(iops))
m = {k: sum(v) / len(v) for k, v in r.items()}
print("\nrandom 4 KiB writes (fio, direct, qd 16, 96 MiB) into ext4, IOPS; mean of two passes in opposite orders")
before = ("before", "first") in m
print(f"{'job':14}{'writable':>12}{'loop file':>12}{'ratio':>8}" + (f"{'before':>12}{'ratio':>8}{'vs before':>11}" if before else ""))
for job in ("first", "rewrite"):
    line = f"{job:14}{m[('ours', job)]:>12.0f}{m[('loop', job)]:>12.0f}{m[('ours', job)] / m[('loop', job)]:>7.2f}x"
    if before:
        b = m[("before", job)]
        line += f"{b:>12.0f}{b / m[('loop', job)]:>7.2f}x{m[('ours', job)] / b:>10.2f}x"
    print(line)
PY
umount "$W/lmnt"
"$B" umount "$W/wmnt" --run-dir "$W/run" 2>/dev/null
if mountpoint -q "$W/wmnt2" 2>/dev/null; then "$LAZY_IMAGE_BENCH_BEFORE" umount "$W/wmnt2" --run-dir "$W/run2" 2>/dev/null; fi
