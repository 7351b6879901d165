#!/usr/bin/env python3
"""qcow2 against the same filesystem as a flat image (issue 30): one ext4 image with one large
file of random bytes, and `qemu-img convert -O qcow2` of it, both served by `lazy-image serve`
on 127.0.0.1. For each, a fresh mount (empty cache) reads the file (cold: time and origin
bytes), then the page cache is dropped and it reads it again (warm). Pairs alternate which goes
first; medians of --repeats. Every read is checked once. Run as root (FUSE backend here):
    python3 bench/qcow2.py [--file-mib 256 --repeats 3]"""

import argparse, hashlib, os, statistics, subprocess

from common import BIN, bench_workdir, cache_stats, drop_caches, free_port, lazy_mount, sh, timed_dd, wait_port



def one(work, url, want):
    """Cold and warm seconds, and origin bytes of the cold read, on a fresh cache."""
    mnt, cache, run = (os.path.join(work, d) for d in ("mnt", "cache", "run"))
    sh("rm", "-rf", cache)
    with lazy_mount(url, mnt, cache, run):
        drop_caches()
        cold = timed_dd(os.path.join(mnt, "big.bin"), want=want)
        drop_caches()
        warm = timed_dd(os.path.join(mnt, "big.bin"), want=want)
    return cold, warm, sum(c["stats"]["origin_bytes"] for c in cache_stats(cache))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file-mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    work, srv, tree = bench_workdir("qcow2", a.file_mib)
    want = hashlib.sha256(open(os.path.join(tree, "big.bin"), "rb").read()).hexdigest()
    sh("mkfs.ext4", "-q", "-F", "-d", tree, os.path.join(srv, "flat.img"), f"{a.file_mib + 64}M")
    sh("qemu-img", "convert", "-O", "qcow2", os.path.join(srv, "flat.img"), os.path.join(srv, "image.qcow2"))
    port = free_port()
    server = subprocess.Popen([BIN, "serve", srv, "--listen", f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    res = {"flat": [], "qcow2": []}
    try:
        wait_port(port)
        for i in range(a.repeats):
            order = ("flat", "qcow2") if i % 2 == 0 else ("qcow2", "flat")
            for who in order:
                name = "flat.img" if who == "flat" else "image.qcow2"
                res[who].append(one(work, f"http://127.0.0.1:{port}/{name}", want if i == 0 else None))
    finally:
        server.kill()
        sh("rm", "-rf", work)
    med = lambda who, k: statistics.median(r[k] for r in res[who])
    mib = a.file_mib
    print(f"\n{mib} MiB file in ext4, flat and as qcow2 (64 KiB clusters), served on 127.0.0.1; medians of {a.repeats}")
    print(f"{'':28}{'flat':>14}{'qcow2':>14}{'qcow2/flat':>12}")
    for label, k in (("cold sequential", 0), ("warm sequential", 1)):
        f, q = mib / med("flat", k), mib / med("qcow2", k)
        print(f"{label:28}{f:>9.0f} MiB/s{q:>9.0f} MiB/s{q / f:>11.2f}x")
    f, q = med("flat", 2), med("qcow2", 2)
    print(f"{'origin bytes, cold read':28}{f / 2**20:>10.1f} MiB{q / 2**20:>10.1f} MiB{q / f:>11.2f}x")


if __name__ == "__main__":
    main()
