#!/bin/sh
# /init of the test VM's initramfs (busybox). Loads modules, builds a writable root from the
# host's root (9p, read-only) under a tmpfs overlay, runs the command from the results share in
# it, records the exit status there, and powers off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/modules/$m.ko" 2>/dev/null || echo "init: insmod $m failed"; done </modules/order
fail() { echo "init: $*"; poweroff -f; }
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=1048576,cache=loose hostroot /host || fail "cannot mount the host root"
mount -t tmpfs -o size=80% tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work,redirect_dir=off,index=off,xino=off overlay /newroot \
    || fail "cannot mount the overlay root"
mkdir -p /newroot/results
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 results /newroot/results || fail "cannot mount the results share"
for d in proc sys dev; do mount --move /$d /newroot/$d 2>/dev/null || mount -o bind /$d /newroot/$d; done
# switch_root, not chroot: the overlay must become the namespace's root, or a thread that
# re-enters this namespace with setns (as the ublk server does to mount) lands in the initramfs.
exec switch_root /newroot /bin/sh -c '
    # /tmp stays the overlay (writable already): a tmpfs there would hide a checkout under /tmp.
    mount -t tmpfs tmpfs /run; mkdir -p /dev/pts /dev/shm
    mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
    [ -d /sys/fs/cgroup ] && mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
    hostname lazy-image-vm
    export HOME=/root PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    . /results/env
    . /results/cwd
    echo "init: running $(cat /results/command)"
    sh -c "$(cat /results/command)" </dev/null 2>&1
    echo $? >/results/exit.tmp && mv /results/exit.tmp /results/exit
    sync
    # Power off now; spin (builtins only: the 9p root goes away) until it happens.
    echo o >/proc/sysrq-trigger 2>/dev/null; while :; do :; done
'
