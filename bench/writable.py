#!/usr/bin/env python3
"""The writable layer (issue 30): random 4 KiB writes, then rewrites of the same blocks, into a
file of an ext4 image mounted with `lazy-image mount --writable` (FUSE backend here), against
the same writes to the same image copied to a local sparse file on a plain loop device mounted
read-write. Then random 4 KiB reads of a file that was never written, on the writable mount
and on a read-only mount of the image (untouched blocks must read at the read-only figure).
The lazy mounts read a warm cache (the image was read once), so the writes, not the origin,
are measured. fio with direct I/O at queue depth 16; pairs alternate which goes first;
medians of --repeats. Run as root:
    python3 bench/writable.py [--file-mib 128 --repeats 3]"""

import argparse, json, os, statistics, subprocess

from common import BIN, bench_workdir, drop_caches, free_port, lazy_mount, sh, wait_port


def fio(path, rw, mib, runtime):
    """IOPS of one fio job on `path` (4 KiB, direct, qd 16)."""
    out = subprocess.run(
        ["fio", "--name=j", f"--filename={path}", f"--rw={rw}", "--bs=4k", f"--size={mib}M", "--direct=1",
         "--ioengine=libaio", "--iodepth=16", f"--runtime={runtime}", "--time_based=0", "--end_fsync=1",
         "--randrepeat=1", "--output-format=json"],
        capture_output=True, check=True, text=True).stdout
    job = json.loads(out)["jobs"][0]
    return job["write" if "write" in rw else "read"]["iops"]


def writes(mnt, mib, runtime):
    """First writes into a new file, then rewrites of it."""
    path = os.path.join(mnt, "fio.dat")
    first = fio(path, "randwrite", mib, runtime)
    again = fio(path, "randwrite", mib, runtime)
    os.unlink(path)
    return first, again


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file-mib", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=60)
    a = ap.parse_args()
    work, srv, tree = bench_workdir("writable", a.file_mib, "old.bin")
    image = os.path.join(srv, "rw.img")
    sh("mkfs.ext4", "-q", "-F", "-b", "4096", "-d", tree, image, f"{3 * a.file_mib + 64}M")
    port = free_port()
    server = subprocess.Popen([BIN, "serve", srv, "--listen", f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/rw.img"
    mnt, cache, run = (os.path.join(work, d) for d in ("mnt", "cache", "run"))
    res = {"loop": [], "lazy": [], "ro": []}
    try:
        wait_port(port)
        with lazy_mount(url, mnt, cache, run):  # warms the cache
            sh("cat", os.path.join(mnt, "old.bin"), stdout=subprocess.DEVNULL)
        for i in range(a.repeats):
            order = ("loop", "lazy") if i % 2 == 0 else ("lazy", "loop")
            for who in order:
                drop_caches()
                if who == "loop":
                    local = os.path.join(work, "local.img")
                    sh("cp", "--sparse=always", image, local)
                    os.makedirs(mnt, exist_ok=True)
                    sh("mount", "-o", "loop", local, mnt)
                    try:
                        w = writes(mnt, a.file_mib, a.runtime)
                        r = fio(os.path.join(mnt, "old.bin"), "randread", a.file_mib, a.runtime)
                    finally:
                        sh("umount", mnt)
                        os.unlink(local)
                    res["loop"].append((*w, r))
                else:
                    with lazy_mount(url, mnt, cache, run, extra=("--writable",)):
                        w = writes(mnt, a.file_mib, a.runtime)
                        r = fio(os.path.join(mnt, "old.bin"), "randread", a.file_mib, a.runtime)
                    res["lazy"].append((*w, r))
                    drop_caches()
                    with lazy_mount(url, mnt, cache, run):
                        res["ro"].append(fio(os.path.join(mnt, "old.bin"), "randread", a.file_mib, a.runtime))
    finally:
        server.kill()
        sh("rm", "-rf", work)
    med = lambda who, k: statistics.median(r[k] for r in res[who])
    print(f"\n{a.file_mib} MiB of random 4 KiB I/O in ext4 (fio, direct, qd 16), IOPS; medians of {a.repeats}")
    print(f"{'':34}{'loop file':>12}{'writable':>12}{'ratio':>8}")
    for label, k in (("first writes", 0), ("rewrites", 1), ("reads of untouched blocks", 2)):
        print(f"{label:34}{med('loop', k):>12.0f}{med('lazy', k):>12.0f}{med('lazy', k) / med('loop', k):>7.2f}x")
    ro = statistics.median(res["ro"])
    print(f"{'untouched reads, read-only mount':34}{'':>12}{ro:>12.0f}   writable/read-only {med('lazy', 2) / ro:.2f}x")


if __name__ == "__main__":
    main()
