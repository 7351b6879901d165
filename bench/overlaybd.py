#!/usr/bin/env python3
"""A 3-layer OverlayBD image against the same filesystem as one flat image (issue 29). An ext4
image with a large file of random bytes and small files (v1) is changed twice in place with
debugfs (v2, v3: files rewritten and added); v3 is the flat image, and `lazy-image convert`
makes the stack: v1 as the base layer, v2 on v1, v3 on v2, plain and as lz4 ZFiles. All are
served by `lazy-image serve` on 127.0.0.1 and mounted with the FUSE backend here.

Per variant and repeat, on a fresh cache: mount, `ls -R` and read one small file (origin bytes
for that), read the large file (cold), drop the page cache, read it again (warm sequential,
1 MiB reads), then random 4 KiB direct reads of it with fio (warm random), then three more
sequential reads with only the large file's pages dropped (warm sequential with the cache
files in memory: the formats' own cost, without this VM's disk, whose speed swings by 2x from
run to run; median of the three). Variants alternate
their order from repeat to repeat; medians of --repeats. The large file is checked once. Last,
a second image on the same base layer (its own diff layer) is mounted on the cache the first
filled: the base layer's bytes each fetched from the origin.
Run as root:
    python3 bench/overlaybd.py [--file-mib 256 --repeats 3]"""

import argparse, hashlib, json, os, random, statistics, subprocess, time

from common import BIN, bench_workdir, cache_stats, drop_caches, evict, free_port, lazy_mount, sh, timed_dd, wait_port


def fio_iops(path, seconds):
    out = subprocess.run(
        ["fio", "--name=r", f"--filename={path}", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync",
         "--time_based", f"--runtime={seconds}", "--output-format=json"],
        capture_output=True, check=True, text=True).stdout
    return json.loads(out)["jobs"][0]["read"]["iops"]


def one(work, url, lowers, want, fio_secs):
    mnt, cache, run = (os.path.join(work, d) for d in ("mnt", "cache", "run"))
    sh("rm", "-rf", cache)
    with lazy_mount(url, mnt, cache, run, lowers):
        sh("ls", "-R", mnt, stdout=subprocess.DEVNULL)
        with open(os.path.join(mnt, "small", "s7.bin"), "rb") as f:
            f.read()
        start_bytes = origin_bytes(cache)
        drop_caches()
        cold = timed_dd(os.path.join(mnt, "big.bin"), want=want)
        drop_caches()
        warm = timed_dd(os.path.join(mnt, "big.bin"))
        iops = fio_iops(os.path.join(mnt, "big.bin"), fio_secs)
        in_memory = []
        for _ in range(3):
            evict(os.path.join(mnt, "big.bin"))
            in_memory.append(timed_dd(os.path.join(mnt, "big.bin")))
    return cold, warm, iops, start_bytes, statistics.median(in_memory)


def origin_bytes(cache):
    """Origin bytes so far of every blob under `cache`: the daemon writes each blob's counters
    to its cache every second, so this waits a little over one."""
    time.sleep(1.2)
    return sum(c["stats"]["origin_bytes"] for c in cache_stats(cache) if c.get("stats"))


def debugfs(img, cmds, work):
    path = os.path.join(work, "debugfs.cmds")
    with open(path, "w") as f:
        f.write("\n".join(cmds) + "\n")
    sh("debugfs", "-w", "-f", path, img, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file-mib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fio-seconds", type=int, default=8)
    a = ap.parse_args()
    work, srv, tree = bench_workdir("overlaybd", a.file_mib)
    os.makedirs(os.path.join(tree, "small"))
    rnd = random.Random(1)
    for i in range(200):
        with open(os.path.join(tree, "small", f"s{i}.bin"), "wb") as f:
            f.write(os.urandom(rnd.randint(4 << 10, 64 << 10)))
    want = hashlib.sha256(open(os.path.join(tree, "big.bin"), "rb").read()).hexdigest()
    v1, v2, v3 = (os.path.join(work, f"v{i}.img") for i in (1, 2, 3))
    sh("mkfs.ext4", "-q", "-F", "-d", tree, v1, f"{a.file_mib + 96}M")
    # Two rounds of changes in place: small files rewritten and added.
    sh("cp", v1, v2)
    extra = os.path.join(work, "extra.bin")
    with open(extra, "wb") as f:
        f.write(os.urandom(256 << 10))
    debugfs(v2, [f"rm /small/s{i}.bin" for i in range(0, 40)] + [f"write {extra} /small/s{i}.bin" for i in range(0, 40)], work)
    sh("cp", v2, v3)
    debugfs(v3, [f"rm /small/s{i}.bin" for i in range(100, 130)] + [f"write {extra} /small/n{i}.bin" for i in range(30)], work)
    sh("cp", v3, os.path.join(srv, "flat.img"))
    conv = lambda *args: sh(BIN, "convert", *args, stdout=subprocess.DEVNULL)
    for suffix, z in (("", []), ("-lz4", ["--compress", "lz4"])):
        conv(v1, os.path.join(srv, f"l1{suffix}.layer"), *z)
        conv(v2, os.path.join(srv, f"l2{suffix}.layer"), "--base", v1, *z)
        conv(v3, os.path.join(srv, f"l3{suffix}.layer"), "--base", v2, *z)
    # Another image on the same base: small files rewritten (its own single diff layer).
    other = os.path.join(work, "other.img")
    sh("cp", v1, other)
    debugfs(other, [f"rm /small/s{i}.bin" for i in range(150, 170)] + [f"write {extra} /small/o{i}.bin" for i in range(20)], work)
    conv(other, os.path.join(srv, "other.layer"), "--base", v1)
    sizes = {n: os.path.getsize(os.path.join(srv, n)) for n in sorted(os.listdir(srv))}
    port = free_port()
    server = subprocess.Popen([BIN, "serve", srv, "--listen", f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    u = lambda n: f"http://127.0.0.1:{port}/{n}"
    variants = {
        "flat": (u("flat.img"), []),
        "3 layers": (u("l3.layer"), [u("l1.layer"), u("l2.layer")]),
        "3 layers lz4": (u("l3-lz4.layer"), [u("l1-lz4.layer"), u("l2-lz4.layer")]),
    }
    res = {k: [] for k in variants}
    try:
        wait_port(port)
        for i in range(a.repeats):
            names = list(variants)
            order = names if i % 2 == 0 else names[::-1]
            for who in order:
                url, lowers = variants[who]
                res[who].append(one(work, url, lowers, want if i == 0 else None, a.fio_seconds))
        shared = second_image_on_the_same_base(work, u, want)
    finally:
        server.kill()
        sh("rm", "-rf", work)
    med = lambda who, k: statistics.median(r[k] for r in res[who])
    mib = a.file_mib
    print(f"\n{mib} MiB file + 200 small files in ext4 changed twice: flat v3 against 3 OverlayBD layers "
          f"(plain and lz4 ZFile), FUSE backend, served on 127.0.0.1; medians of {a.repeats}")
    print("layer files: " + ", ".join(f"{n} {s / 2**20:.1f} MiB" for n, s in sizes.items()))
    print(f"{'':30}" + "".join(f"{k:>16}" for k in variants) + "".join(f"{k + '/flat':>20}" for k in list(variants)[1:]))
    rows = (("cold sequential MiB/s", lambda w: mib / med(w, 0)), ("warm sequential MiB/s", lambda w: mib / med(w, 1)),
            ("warm seq., cache in memory", lambda w: mib / med(w, 4)),
            ("warm random 4 KiB IOPS", lambda w: med(w, 2)), ("origin MiB, mount+ls+1 file", lambda w: med(w, 3) / 2**20))
    for label, f in rows:
        vals = {w: f(w) for w in variants}
        print(f"{label:30}" + "".join(f"{vals[w]:>16.1f}" for w in variants) + "".join(f"{vals[w] / vals['flat']:>19.2f}x" for w in list(variants)[1:]))
    first, second, size = shared
    print(f"two images on one base layer ({size / 2**20:.1f} MiB): the first fetched {first / 2**20:.1f} MiB of it, "
          f"the second (cold, same node cache) {second / 2**20:.1f} MiB")


def second_image_on_the_same_base(work, u, want):
    """Mounts image A (l1+l2+l3) and reads the large file, then image B (l1 + a layer of its
    own) on the same cache: bytes of the base layer each fetched from the origin."""
    mnt, cache, run = (os.path.join(work, d) for d in ("mnt", "cache", "run"))
    sh("rm", "-rf", cache)
    fetched = []
    for url, lowers in ((u("l3.layer"), [u("l1.layer"), u("l2.layer")]), (u("other.layer"), [u("l1.layer")])):
        with lazy_mount(url, mnt, cache, run, lowers):
            drop_caches()
            timed_dd(os.path.join(mnt, "big.bin"), want=want)
        base = [c for c in cache_stats(cache) if c["url"].endswith("/l1.layer")][0]
        fetched.append(base["stats"]["origin_bytes"])
    return fetched[0], fetched[1], base["size"]


if __name__ == "__main__":
    main()
