#!/usr/bin/env python3
"""Local sources (issue 31): lazy-image reading a block device or a file on this node, against
reading the same source directly. One ext4 image with one large file of random bytes on local
disk, a read-only loop device over it.
  - cold sequential through a slow device: the loop device throttled to disk-like speed
    (--mbps, blkio cgroup); direct = that device mounted and the file read, lazy-image =
    `lazy-image mount /dev/loopN` (the device source, O_DIRECT) with an empty cache, file read;
  - warm sequential: page cache dropped; direct = the image file loop-mounted (unthrottled),
    lazy-image = the same mount again, its cache holding the file.
Pairs alternate which system goes first; medians of --repeats. Every read is checked once
against the file. Run as root (FUSE backend on this host):
    python3 bench/local.py [--file-mib 384 --mbps 200 --repeats 3]"""

import argparse, hashlib, os, statistics, subprocess, tempfile

from common import BIN, ROOT, drop_caches, sh, timed_dd, wait_for

CGROUP = "/sys/fs/cgroup/blkio/lazy-image-bench"


def throttled(argv):
    """argv run inside the throttled cgroup."""
    return ["sh", "-c", f'echo $$ > {CGROUP}/cgroup.procs && exec "$@"', "sh"] + argv


class Lazy:
    def __init__(self, work, url):
        self.work, self.url = work, url
        self.mnt, self.cache, self.run = (os.path.join(work, d) for d in ("lazy-mnt", "lazy-cache", "lazy-run"))
        os.makedirs(self.mnt, exist_ok=True)

    def mount(self, fresh):
        if fresh:
            sh("rm", "-rf", self.cache)
        argv = [BIN, "mount", self.url, self.mnt, "--backend", "fuse", "--cache-dir", self.cache, "--run-dir", self.run]
        # The daemon reads the device: it is the one throttled.
        self.proc = subprocess.Popen(throttled(argv), stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.ismount(self.mnt), "lazy-image mount")

    def umount(self):
        sh(BIN, "umount", self.mnt, "--run-dir", self.run, stderr=subprocess.DEVNULL)
        self.proc.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file-mib", type=int, default=384)
    ap.add_argument("--mbps", type=int, default=200, help="the slow device's read rate, MB/s")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    sh("cargo", "build", "-q", "--bin", "lazy-image", cwd=ROOT)
    work = tempfile.mkdtemp(prefix="lazy-local-bench-", dir="/var/tmp")
    tree, image = os.path.join(work, "tree"), os.path.join(work, "image.ext4")
    os.makedirs(tree)
    with open(os.path.join(tree, "big.bin"), "wb") as f:
        for _ in range(a.file_mib):
            f.write(os.urandom(1 << 20))
    want = hashlib.sha256(open(os.path.join(tree, "big.bin"), "rb").read()).hexdigest()
    sh("mkfs.ext4", "-q", "-F", "-d", tree, image, f"{a.file_mib + 64}M")
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", image], capture_output=True, check=True, text=True).stdout.strip()
    os.makedirs(CGROUP, exist_ok=True)
    rdev = os.stat(dev).st_rdev
    with open(f"{CGROUP}/blkio.throttle.read_bps_device", "w") as f:
        f.write(f"{os.major(rdev)}:{os.minor(rdev)} {a.mbps * 1000 * 1000}")
    direct_mnt = os.path.join(work, "direct-mnt")
    os.makedirs(direct_mnt)
    lazy = Lazy(work, dev)
    cold = {"direct": [], "lazy": []}
    warm = {"direct": [], "lazy": []}
    try:
        for i in range(a.repeats):
            check = want if i == 0 else None
            for who in (("direct", "lazy") if i % 2 == 0 else ("lazy", "direct")):
                if who == "direct":
                    sh("mount", "-o", "ro,noload", dev, direct_mnt)
                    drop_caches()
                    cold["direct"].append(timed_dd(os.path.join(direct_mnt, "big.bin"), throttled, want=check))
                    sh("umount", direct_mnt)
                    # Warm direct: the image file itself, unthrottled, page cache dropped.
                    fdev = subprocess.run(["losetup", "--find", "--show", "--read-only", image], capture_output=True, check=True,
                                          text=True).stdout.strip()
                    sh("mount", "-o", "ro,noload", fdev, direct_mnt)
                    drop_caches()
                    warm["direct"].append(timed_dd(os.path.join(direct_mnt, "big.bin"), want=check))
                    sh("umount", direct_mnt)
                    sh("losetup", "-d", fdev)
                else:
                    lazy.mount(fresh=True)
                    drop_caches()
                    cold["lazy"].append(timed_dd(os.path.join(lazy.mnt, "big.bin"), want=check))
                    drop_caches()
                    warm["lazy"].append(timed_dd(os.path.join(lazy.mnt, "big.bin"), want=check))
                    lazy.umount()
    finally:
        subprocess.run(["umount", direct_mnt], stderr=subprocess.DEVNULL)
        if os.path.ismount(lazy.mnt):
            subprocess.run([BIN, "umount", lazy.mnt, "--run-dir", lazy.run], stderr=subprocess.DEVNULL)
        subprocess.run(["losetup", "-d", dev])
        os.rmdir(CGROUP)
        sh("rm", "-rf", work)
    mib = a.file_mib
    med = lambda v: statistics.median(v)
    print(f"\n{mib} MiB file in ext4 on a loop device; medians of {a.repeats}, pairs alternating who goes first")
    print(f"{'':34}{'direct':>12}{'lazy-image':>12}{'lazy/direct':>13}")
    for name, d in ((f"cold sequential, device at {a.mbps} MB/s", cold), ("warm sequential, page cache dropped", warm)):
        r, l = mib / med(d["direct"]), mib / med(d["lazy"])
        print(f"{name:34}{r:>8.0f} MiB/s{l:>8.0f} MiB/s{l / r:>12.2f}x")


if __name__ == "__main__":
    main()
