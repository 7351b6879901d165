#!/usr/bin/env python3
"""Compares lazy-image (FUSE+loop on this host) with what a user would pick instead, on one ext4
image served by nginx on 127.0.0.1, with no added latency and with DELAY ms each way:
  - curl: download the whole image, then loop-mount it;
  - qemu-storage-daemon: its http block driver under a qcow2 copy-on-read overlay (the cache),
    exported over FUSE, loop-mounted;
  - nbdkit: curl plugin + cache filter (cache-on-read), exposed by nbdfuse, loop-mounted.
Per system: first `ls` + 4 KiB read after attach and its origin bytes; cold sequential read of a
file; cold random 4 KiB reads (IOPS, p50/p99, origin bytes); the same reads again warm (page cache
dropped, the system's own cache kept). Every byte read is checked. Curl's download, cold
sequential and each warm measurement run --repeats times and the median counts. Run as root:
    python3 bench/run.py [--image-mib 2048 --seq-mib 512 --random-reads 2000 --delay-ms 5]"""

import argparse, functools, hashlib, os, random, subprocess, sys, tempfile, threading, time

from common import BIN, ROOT, drop_caches, free_port, sh, wait_for, wait_port


class Nginx:
    """nginx serving DIR; counts body bytes sent from its access log."""

    def __init__(self, work, root):
        self.port = free_port()
        self.log = os.path.join(work, "access.log")
        conf = os.path.join(work, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""user root; daemon off; pid {work}/nginx.pid; error_log {work}/error.log;
events {{}}
http {{ log_format b '$body_bytes_sent'; access_log {self.log} b;
  client_body_temp_path {work}; proxy_temp_path {work}; fastcgi_temp_path {work};
  uwsgi_temp_path {work}; scgi_temp_path {work};
  server {{ listen 127.0.0.1:{self.port}; root {root}; sendfile on; }} }}
""")
        self.proc = subprocess.Popen(["nginx", "-c", conf], stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def bytes_sent(self):
        if not os.path.exists(self.log):
            return 0
        return sum(int(l) for l in open(self.log) if l.strip().isdigit())

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def read_verify(path, want_sha):
    """Reads the whole file in 4 MiB steps into memory and returns the time the reads took; the
    bytes are checked after the clock stops. Hashing inside the timed loop made this reader's
    SHA-256 (about 1.1 GB/s here) part of every system's figure, while curl's rate, the one it
    is compared with, has no hashing in it."""
    buf = bytearray(os.path.getsize(path))
    view, n = memoryview(buf), 0
    t = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(view[n:n + (4 << 20)])
            if not got:
                break
            n += got
    dt = time.monotonic() - t
    assert n == len(buf) and hashlib.sha256(buf).hexdigest() == want_sha, f"{path}: wrong bytes"
    return dt


def random_reads(path, src, n, seed, origin=None):
    """n random 4 KiB reads of `path`, each checked against `src`. With `origin` (port, size),
    each read is paired with a 4 KiB ranged GET of the image at another random offset, over a
    kept-alive connection, alternating which goes first: what one miss must cost at least,
    measured beside the reads, against an origin whose page cache is as cold as theirs."""
    import http.client
    rnd, grnd = random.Random(seed), random.Random(seed + 1000)
    size = os.path.getsize(path)
    lat, glat = [], []
    conn = http.client.HTTPConnection("127.0.0.1", origin[0]) if origin else None

    def get():
        off = grnd.randrange(origin[1] // 4096) * 4096
        t = time.monotonic()
        conn.request("GET", "/bench.img", headers={"Range": f"bytes={off}-{off + 4095}"})
        body = conn.getresponse().read()
        glat.append(time.monotonic() - t)
        assert len(body) == 4096, "short ranged GET"

    with open(path, "rb", buffering=0) as f, open(src, "rb", buffering=0) as s:
        fd, sfd = f.fileno(), s.fileno()
        for k in range(n):
            off = rnd.randrange(size // 4096) * 4096
            if conn and k % 2:
                get()
            t = time.monotonic()
            got = os.pread(fd, 4096, off)
            lat.append(time.monotonic() - t)
            if conn and not k % 2:
                get()
            assert got == os.pread(sfd, 4096, off), f"{path}@{off}: wrong bytes"
    if conn:
        conn.close()
    st = latency_stats(lat)
    if glat:
        st["get_p50_ms"] = latency_stats(glat)["p50_ms"]
    return st


def latency_stats(lat):
    n = len(lat)
    lat = sorted(lat)
    return {"iops": n / sum(lat), "p50_ms": 1000 * lat[n // 2], "p99_ms": 1000 * lat[int(n * 0.99)]}


# Warm figures are paired: each read goes to the system and to the baseline (the image file on a
# plain loop device) in turn, alternating which goes first. This VM's disk and wakeup latencies
# drift by 2x within minutes; measured one after the other, the ratio mostly measured the drift.

def paired_sequential(path, base, want_sha):
    """Reads two copies of a file in 4 MiB steps, alternately; returns (rate, base rate)."""
    hs, ts = [hashlib.sha256(), hashlib.sha256()], [0.0, 0.0]
    with open(path, "rb", buffering=0) as a, open(base, "rb", buffering=0) as b:
        files, done, step = [a, b], [False, False], 0
        while not all(done):
            for i in ((0, 1) if step % 2 == 0 else (1, 0)):
                if done[i]:
                    continue
                t = time.monotonic()
                chunk = files[i].read(4 << 20)
                ts[i] += time.monotonic() - t
                done[i] = not chunk
                hs[i].update(chunk)
            step += 1
    for h, p in zip(hs, (path, base)):
        assert h.hexdigest() == want_sha, f"{p}: wrong bytes"
    size = os.path.getsize(path)
    return size / ts[0], size / ts[1]


def paired_random(path, base, src, n, seed):
    """The same n random 4 KiB reads on two copies, interleaved; returns (stats, base stats)."""
    rnd = random.Random(seed)
    size = os.path.getsize(path)
    lats = [[], []]
    with open(path, "rb", buffering=0) as a, open(base, "rb", buffering=0) as b, open(src, "rb", buffering=0) as s:
        fds = [a.fileno(), b.fileno()]
        for k in range(n):
            off = rnd.randrange(size // 4096) * 4096
            want = os.pread(s.fileno(), 4096, off)
            for i in ((0, 1) if k % 2 == 0 else (1, 0)):
                t = time.monotonic()
                got = os.pread(fds[i], 4096, off)
                lats[i].append(time.monotonic() - t)
                assert got == want, f"{(path, base)[i]}@{off}: wrong bytes"
    return latency_stats(lats[0]), latency_stats(lats[1])


def median(xs):
    return sorted(xs)[len(xs) // 2]


def ratio(pair):
    """System over baseline, for a (rate, base rate) or (stats, base stats) pair."""
    a, b = pair
    return a["iops"] / b["iops"] if isinstance(a, dict) else a / b


def paired_passes(n, one_pass):
    """Runs a paired measurement n times, page cache dropped before each; returns the pass with
    the median ratio, and every pass's ratio under "ratios"."""
    passes = []
    for _ in range(n):
        drop_caches()
        passes.append(one_pass())
    ratios = [ratio(p) for p in passes]
    pick = passes[ratios.index(median(ratios))]
    return (*pick, ratios)


def loop_mount(image, mnt):
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", image], capture_output=True, check=True, text=True).stdout.strip()
    try:
        sh("mount", "-o", "ro,noload", dev, mnt)
    except subprocess.CalledProcessError:
        # Not mounted, so no clean-up would find it: a peer whose export gave the loop device
        # an unreadable superblock left it attached after the run.
        subprocess.run(["losetup", "-d", dev])
        raise
    return dev


def loop_umount(dev, mnt):
    sh("umount", mnt)
    sh("losetup", "-d", dev)


def force_unmount_under(d):
    """After a system was killed: detaches whatever it left mounted under `d`, deepest first, and
    the loop devices under those mounts."""
    mounts = []
    for line in open("/proc/self/mountinfo"):
        f = line.split()
        point, source = f[4], f[f.index("-") + 2]
        if point == d or point.startswith(d.rstrip("/") + "/"):
            mounts.append((point, source))
    for point, source in sorted(mounts, key=lambda m: -len(m[0])):
        subprocess.run(["umount", "-l", point], stderr=subprocess.DEVNULL)
        if source.startswith("/dev/loop"):
            subprocess.run(["losetup", "-d", source], stderr=subprocess.DEVNULL)


class System:
    """What every compared system has: a process to kill when it hangs, and a directory holding
    everything it mounts."""
    proc = None
    root = None

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()

    def cleanup(self):
        self.kill()
        force_unmount_under(self.root)
        if self.proc:
            self.proc.wait()


class Ours(System):
    name = "lazy-image"

    def __init__(self, work, url, extra, bin=BIN, name=None):
        tag = name or "ours"
        self.root = self.work = os.path.join(work, tag)
        self.url, self.extra, self.bin = url, extra, bin
        if name:
            self.name = name
        self.mnt = os.path.join(work, tag + "-mnt")
        self.cache = os.path.join(work, tag + "-cache")
        os.makedirs(self.mnt, exist_ok=True)

    def mount(self, keep_cache=False):
        if not keep_cache:
            sh("rm", "-rf", self.cache)
        self.proc = subprocess.Popen([self.bin, "mount", self.url, self.mnt, "--backend", "fuse", "--cache-dir", self.cache,
                                      "--run-dir", os.path.join(self.work, "run")] + self.extra, stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.ismount(self.mnt), "lazy-image mount")
        return self.mnt

    def umount(self):
        sh(self.bin, "umount", self.mnt, "--run-dir", os.path.join(self.work, "run"), stderr=subprocess.DEVNULL)
        self.proc.wait()

    def mount_prefetching(self):
        """A fresh mount that fills the rest of the image in the background (`--prefetch`)."""
        self.extra, extra = self.extra + ["--prefetch"], self.extra
        try:
            return self.mount()
        finally:
            self.extra = extra

    def mount_complete(self):
        """Fetches what the cache lacks (`lazy-image warm`), then mounts: the loop device reads the
        complete cache file directly."""
        sh(self.bin, "warm", self.url, "--cache-dir", self.cache, stderr=subprocess.DEVNULL)
        return self.mount(keep_cache=True)


class QemuStorageDaemon(System):
    name = "qemu-storage-daemon"

    def __init__(self, work, url, size):
        self.dir = os.path.join(work, "qsd")
        self.root = self.dir
        self.url, self.size = url, size
        self.mnt = os.path.join(self.dir, "mnt")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)

    def mount(self):
        ovl, export = os.path.join(self.dir, "ovl.qcow2"), os.path.join(self.dir, "export")
        for p in (ovl, export):
            if os.path.exists(p):
                os.unlink(p)
        sh("qemu-img", "create", "-q", "-f", "qcow2", ovl, str(self.size))
        open(export, "w").close()
        self.proc = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=http,node-name=web,url={self.url},read-only=on",
            "--blockdev", f"driver=qcow2,node-name=ovl,file.driver=file,file.filename={ovl},backing=web",
            "--blockdev", "driver=copy-on-read,node-name=cor,file=ovl",
            "--export", f"type=fuse,id=exp,node-name=cor,mountpoint={export},writable=off"], stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.getsize(export) == self.size, "qemu-storage-daemon FUSE export")
        self.dev = loop_mount(export, self.mnt)
        return self.mnt

    def umount(self):
        loop_umount(self.dev, self.mnt)
        self.proc.terminate()
        self.proc.wait()


class Nbdkit(System):
    name = "nbdkit"

    def __init__(self, work, url):
        self.root = os.path.join(work, "nbdkit")
        self.dir = os.path.join(self.root, "fuse")
        self.url = url
        self.mnt = os.path.join(self.root, "mnt")
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)

    def mount(self):
        self.proc = subprocess.Popen(["nbdfuse", "-r", self.dir, "[", "nbdkit", "--exit-with-parent", "--filter=cache", "curl",
                                      f"url={self.url}", "cache-on-read=true", "]"], stderr=subprocess.DEVNULL)
        nbd = os.path.join(self.dir, "nbd")
        wait_for(lambda: os.path.exists(nbd), "nbdfuse")
        self.dev = loop_mount(nbd, self.mnt)
        return self.mnt

    def umount(self):
        loop_umount(self.dev, self.mnt)
        sh("fusermount3", "-u", self.dir)
        self.proc.wait()


def download_rate(url, dest, size):
    """curl's rate for the whole image, page cache dropped first; the copy is deleted at once, so
    its dirty pages are never written back under a later measurement."""
    drop_caches()
    t = time.monotonic()
    sh("curl", "-sSf", "-o", dest, url)
    rate = size / (time.monotonic() - t)
    os.unlink(dest)
    return rate


def measure(system, nginx, a, tree, seq_sha, small_bytes, base, origin, download):
    """One system, cold then warm: returns its row of figures. `base` is the mount point of the
    image file on a plain loop device, the baseline for warm reads; `origin` (port, size) is where
    cold random reads measure their paired GETs; `download()` gives curl's rate, the baseline of
    cold sequential reads."""
    r = {}
    before = nginx.bytes_sent()
    mnt = system.mount()
    t = time.monotonic()
    os.listdir(mnt)
    assert open(os.path.join(mnt, "etc/conf7"), "rb").read() == small_bytes
    r["first_s"] = time.monotonic() - t
    system.umount()
    r["first_origin"] = nginx.bytes_sent() - before

    # Cold sequential, `repeats` times from an empty cache, each pass paired with a curl download
    # of the image right before or after it (alternating): curl's rate measured minutes earlier
    # drifts with this VM as much as ours does. The pass with the median ratio counts; the last
    # pass's cache then serves the warm reads.
    passes = []
    for i in range(a.repeats):
        if i:
            system.umount()
        curl_rate = download() if i % 2 == 0 else None
        drop_caches()
        mnt = system.mount()
        rate = a.seq_mib * 2**20 / read_verify(os.path.join(mnt, "seq.bin"), seq_sha)
        passes.append((rate, curl_rate if curl_rate is not None else download()))
    ratios = [ratio(p) for p in passes]
    r["seq"] = (*passes[ratios.index(median(ratios))], ratios)
    r["seq_rates"], r["seq_curl"] = [p[0] for p in passes], [p[1] for p in passes]
    r["warm_seq"] = paired_passes(a.repeats, lambda: paired_sequential(os.path.join(mnt, "seq.bin"), os.path.join(base, "seq.bin"), seq_sha))
    system.umount()

    before = nginx.bytes_sent()
    mnt = system.mount()
    r["rand"] = random_reads(os.path.join(mnt, "rand.bin"), os.path.join(tree, "rand.bin"), a.random_reads, 7, origin)
    r["rand_origin"] = nginx.bytes_sent() - before - a.random_reads * 4096  # less the paired GETs
    r["warm_rand"] = paired_passes(a.repeats, lambda: paired_random(os.path.join(mnt, "rand.bin"), os.path.join(base, "rand.bin"), os.path.join(tree, "rand.bin"), a.random_reads, 7))
    system.umount()

    if hasattr(system, "mount_prefetching"):
        # Cold random reads while a background fill runs beside them (other offsets than above).
        mnt = system.mount_prefetching()
        r["rand_prefetch"] = random_reads(os.path.join(mnt, "rand.bin"), os.path.join(tree, "rand.bin"), a.random_reads // 4, 9)
        system.umount()

    if hasattr(system, "mount_complete"):
        # The same warm reads once the whole image is cached (pre-warmed node, or a re-attach).
        mnt = system.mount_complete()
        before = nginx.bytes_sent()
        r["full_seq"] = paired_passes(a.repeats, lambda: paired_sequential(os.path.join(mnt, "seq.bin"), os.path.join(base, "seq.bin"), seq_sha))
        r["full_rand"] = paired_passes(a.repeats, lambda: paired_random(os.path.join(mnt, "rand.bin"), os.path.join(base, "rand.bin"), os.path.join(tree, "rand.bin"), a.random_reads, 7))
        r["full_origin"] = nginx.bytes_sent() - before
        system.umount()
    print(f"bench:   {system.name}: done", file=sys.stderr)
    return r


def measure_with_deadline(system, seconds, *args):
    """A peer that stops answering (qemu-storage-daemon's FUSE export once did) must not hang the
    whole run: past the deadline its processes are killed, its reads fail, and its column says so."""
    timer = threading.Timer(seconds, system.kill)
    timer.start()
    try:
        return measure(system, *args)
    except Exception as e:
        why = f"killed after {seconds} s" if not timer.is_alive() else f"failed: {e}"
        print(f"bench:   {system.name}: {why}", file=sys.stderr)
        system.cleanup()
        return {"failed": why}
    finally:
        timer.cancel()


# A VM whose balloon reports free pages hands memory freed in large blocks back to the host, and
# the next write into such a page faults on the host. Every `drop_caches` here frees up to 1 GiB
# that way, so whichever copy next fills fresh pages from a guest CPU pays: the kernel's copy of
# FUSE replies into the page cache took 0.07 s or 1.1 s for the same 512 MiB, pass to pass, and
# curl, which fills 2 GiB of page cache per download, ran at about half its rate (670 vs 1280
# MiB/s). A node's page cache is not dropped every few seconds, so the bench raises the reporting
# order past the largest block while it runs, and restores it after.
PAGE_REPORTING = "/sys/module/page_reporting/parameters/page_reporting_order"


def pause_page_reporting():
    """Stops free page reporting; returns the setting to restore, or None where there is none."""
    try:
        with open(PAGE_REPORTING) as f:
            old = f.read().strip()
    except OSError:
        return None
    try:
        with open(PAGE_REPORTING, "w") as f:
            f.write("11")
    except OSError as e:
        # Kernels that cap the order at the largest block (10) keep reporting 4 MiB blocks.
        print(f"bench: free page reporting left on ({e})", file=sys.stderr)
        return None
    print(f"bench: free page reporting paused (page_reporting_order {old} -> 11)", file=sys.stderr)
    return old


# Linux keeps per-destination TCP metrics from closed connections (the slow-start threshold among
# them) and starts new connections to the same address from them. Here every system talks to
# 127.0.0.1, so each measurement started from whatever the one before left (a threshold of 27-44
# segments after one of our cold reads): curl at 5 ms downloaded at 1133-1150 MiB/s right after
# one of our reads and at 1146-1173 right after the metrics were cleared (4 alternating pairs,
# slower every time). The bench stops saving them while it runs and clears 127.0.0.1's, so every
# system's connections start alike; the setting is restored after.
NO_METRICS_SAVE = "/proc/sys/net/ipv4/tcp_no_metrics_save"


def stop_tcp_metrics():
    """Stops saving TCP metrics and clears 127.0.0.1's; returns the setting to restore, or None."""
    try:
        with open(NO_METRICS_SAVE) as f:
            old = f.read().strip()
        with open(NO_METRICS_SAVE, "w") as f:
            f.write("1")
    except OSError as e:
        print(f"bench: TCP metrics left as they are ({e})", file=sys.stderr)
        return None
    try:
        cleared = subprocess.run(["ip", "tcp_metrics", "flush", "127.0.0.1"], stderr=subprocess.DEVNULL).returncode == 0
    except OSError:
        cleared = False
    print(f"bench: TCP metrics not saved during the run (tcp_no_metrics_save {old} -> 1), 127.0.0.1's "
          + ("cleared" if cleared else "NOT cleared (`ip tcp_metrics flush` failed)"), file=sys.stderr)
    return old


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-mib", type=int, default=2048)
    ap.add_argument("--seq-mib", type=int, default=512)
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--delay-ms", type=int, default=5)
    ap.add_argument("--chunk-size", default=None, help="lazy-image --chunk-size (default: the engine's)")
    ap.add_argument("--no-peers", action="store_true", help="only lazy-image and curl")
    ap.add_argument("--compare-bin", default=None,
                    help="another lazy-image binary (e.g. the build before a change), measured in the same run as 'before'")
    ap.add_argument("--repeats", type=int, default=3, help="passes of cold sequential, curl and each warm measurement; the median counts")
    ap.add_argument("--deadline-s", type=int, default=1200, help="a system still measuring after this is killed")
    ap.add_argument("--keep-page-reporting", action="store_true", help="leave the VM's free page reporting on (see PAGE_REPORTING)")
    a = ap.parse_args()
    sh("cargo", "build", "-q", "--bin", "lazy-image", cwd=ROOT)
    work = tempfile.mkdtemp(prefix="lazy-bench.")
    tree, srv = os.path.join(work, "tree"), os.path.join(work, "srv")
    os.makedirs(os.path.join(tree, "etc"))
    os.makedirs(srv)
    # The origin's storage is not the node's: served from memory, nginx does not share this
    # disk with the cache writes of the systems measured (curl's writes land after its timed
    # download; ours and the peers' during their reads, which slowed nginx's reads: a cold
    # sequential read ran at 724 MiB/s with the cache on this disk and 888 on a tmpfs).
    sh("mount", "-t", "tmpfs", "-o", f"size={a.image_mib + 64}m", "lazy-bench-origin", srv)
    # lazy-image's FUSE backend takes requests over io_uring where the kernel offers it (the
    # fuse module's enable_uring, kernel 6.14+); qemu-storage-daemon and nbdfuse use /dev/fuse.
    uring = "/sys/module/fuse/parameters/enable_uring"
    if os.path.exists(uring):
        with open(uring, "w") as f:
            f.write("Y\n")
        print("bench: FUSE over io_uring enabled (fuse.enable_uring=Y)", file=sys.stderr)
    print(f"bench: building a {a.image_mib} MiB ext4 image in {work}", file=sys.stderr)
    rnd = random.Random(1)
    with open(os.path.join(tree, "seq.bin"), "wb") as f:
        for _ in range(a.seq_mib):
            f.write(rnd.randbytes(1 << 20))
    with open(os.path.join(tree, "rand.bin"), "wb") as f:
        for _ in range(a.image_mib // 2):
            f.write(rnd.randbytes(1 << 20))
    for i in range(200):
        with open(os.path.join(tree, "etc", f"conf{i}"), "wb") as f:
            f.write(rnd.randbytes(4096))
    image = os.path.join(srv, "bench.img")
    sh("mkfs.ext4", "-q", "-F", "-d", tree, image, f"{a.image_mib}M")
    img_size = os.path.getsize(image)
    seq_sha = hashlib.sha256(open(os.path.join(tree, "seq.bin"), "rb").read()).hexdigest()
    small_bytes = open(os.path.join(tree, "etc", "conf7"), "rb").read()

    nginx = Nginx(work, srv)
    # The baseline for warm reads, mounted for the whole run: the image file on a plain loop
    # device, a copy on this disk as the systems' caches are.
    base = os.path.join(work, "base")
    os.makedirs(base)
    base_image = os.path.join(work, "base.img")
    sh("cp", image, base_image)
    base_dev = loop_mount(base_image, base)
    runs = []
    reporting = None if a.keep_page_reporting else pause_page_reporting()
    metrics = stop_tcp_metrics()
    try:
        for delay in (0, a.delay_ms):
            port, proxy = nginx.port, None
            if delay:
                port = free_port()
                proxy = subprocess.Popen([BIN, "proxy", "--listen", f"127.0.0.1:{port}", "--upstream",
                                          f"127.0.0.1:{nginx.port}", "--delay-ms", str(delay)], stderr=subprocess.DEVNULL)
                wait_port(port)
            url = f"http://127.0.0.1:{port}/bench.img"
            print(f"bench: {delay} ms each way", file=sys.stderr)
            run = {"delay": delay}
            # curl + loop: the whole image before the first byte.
            dl = os.path.join(work, "dl.img")
            dl_rates, first = [], []
            for _ in range(a.repeats):
                drop_caches()
                t = time.monotonic()
                sh("curl", "-sSf", "-o", dl, url)
                dl_rates.append(img_size / (time.monotonic() - t))
                mnt = os.path.join(work, "cmnt")
                os.makedirs(mnt, exist_ok=True)
                dev = loop_mount(dl, mnt)
                os.listdir(mnt)
                assert open(os.path.join(mnt, "etc/conf7"), "rb").read() == small_bytes
                first.append(time.monotonic() - t)
                loop_umount(dev, mnt)
                os.unlink(dl)
            run["curl_rate"], run["curl_rates"], run["curl_first_s"] = median(dl_rates), dl_rates, median(first)
            extra = ["--chunk-size", a.chunk_size] if a.chunk_size else []
            systems = [Ours(work, url, extra)]
            if a.compare_bin:
                systems.append(Ours(work, url, extra, bin=a.compare_bin, name="before"))
            if not a.no_peers:
                systems += [QemuStorageDaemon(work, url, img_size), Nbdkit(work, url)]
            download = functools.partial(download_rate, url, dl, img_size)
            run["systems"] = {s.name: measure_with_deadline(s, a.deadline_s, nginx, a, tree, seq_sha, small_bytes, base, (port, img_size), download)
                              for s in systems}
            if proxy:
                proxy.terminate()
                proxy.wait()
            runs.append(run)
    finally:
        if reporting is not None:
            with open(PAGE_REPORTING, "w") as f:
                f.write(reporting)
        if metrics is not None:
            with open(NO_METRICS_SAVE, "w") as f:
                f.write(metrics)
        loop_umount(base_dev, base)
        nginx.stop()
        force_unmount_under(work)
        sh("rm", "-rf", work)

    mib = 2**20
    asked = a.random_reads * 4096
    names = list(runs[0]["systems"])
    print(f"\nimage {img_size / mib:.0f} MiB ext4 served by nginx on 127.0.0.1; delays added each way by `lazy-image proxy`")
    if os.path.exists(PAGE_REPORTING):
        print("free page reporting " + ("paused during the run" if reporting is not None else "left on (--keep-page-reporting, or refused)"))
    print("TCP metrics " + ("not saved during the run" if metrics is not None else "saved as the system does (setting refused)"))
    cols = [(r, n) for r in runs for n in names]
    print(f"{'':40}" + "".join(f"{n[:14] + ' ' + str(r['delay']) + 'ms':>22}" for r, n in cols))

    def passes(ratios):
        return " ".join(f"{x:.2f}" for x in ratios)

    def line(label, f):
        cells = []
        for r, n in cols:
            s = r["systems"][n]
            if "failed" in s:
                cells.append("-")
            else:
                try:
                    cells.append(f(r, s))
                except KeyError:
                    cells.append("n/a")
        print(f"{label:40}" + "".join(f"{c:>22}" for c in cells))
    line("first ls+4K read after attach (s)", lambda r, s: f"{s['first_s']:.3f}")
    line("  (curl download+mount: s)", lambda r, s: f"{r['curl_first_s']:.2f}")
    line("  origin bytes for it (% of image)", lambda r, s: f"{100 * s['first_origin'] / img_size:.3f}%")
    line("cold sequential MiB/s (x curl, paired)", lambda r, s: f"{s['seq'][0] / mib:.0f} ({s['seq'][0] / s['seq'][1]:.2f}x)")
    line("  each pass (x curl)", lambda r, s: passes(s["seq"][2]))
    line("  median pass (x curl's rate at start)", lambda r, s: f"{median(s['seq_rates']) / r['curl_rate']:.2f}x")
    line("cold random 4K IOPS", lambda r, s: f"{s['rand']['iops']:.0f}")
    line("cold random 4K p50 / p99 ms", lambda r, s: f"{s['rand']['p50_ms']:.2f}/{s['rand']['p99_ms']:.2f}")
    line("  p50 / one ranged GET's p50 (paired)", lambda r, s: f"{s['rand']['p50_ms'] / s['rand']['get_p50_ms']:.2f}x")
    # What a miss adds to a read of the same offsets once cached (the warm p50 below): the
    # filesystem, loop and FUSE path costs a cold read as much as a warm one, on top of the GET.
    line("  (cold p50 - warm p50) / one GET's p50", lambda r, s: f"{(s['rand']['p50_ms'] - s['warm_rand'][0]['p50_ms']) / s['rand']['get_p50_ms']:.2f}x")
    line("cold random origin bytes / asked", lambda r, s: f"{s['rand_origin'] / asked:.1f}x")
    line("warm sequential MiB/s (x loop, paired)", lambda r, s: f"{s['warm_seq'][0] / mib:.0f} ({s['warm_seq'][0] / s['warm_seq'][1]:.2f}x)")
    line("  each pass (x loop)", lambda r, s: passes(s["warm_seq"][2]))
    line("warm random 4K IOPS (x loop, paired)", lambda r, s: f"{s['warm_rand'][0]['iops']:.0f} ({s['warm_rand'][0]['iops'] / s['warm_rand'][1]['iops']:.2f}x)")
    line("  each pass (x loop)", lambda r, s: passes(s["warm_rand"][2]))
    line("  warm random p50 ms (loop's)", lambda r, s: f"{s['warm_rand'][0]['p50_ms']:.2f} ({s['warm_rand'][1]['p50_ms']:.2f})")
    line("cold random p50/p99 ms during --prefetch", lambda r, s: f"{s['rand_prefetch']['p50_ms']:.2f}/{s['rand_prefetch']['p99_ms']:.2f}")
    line("complete cache: warm seq (x loop)", lambda r, s: f"{s['full_seq'][0] / mib:.0f} ({s['full_seq'][0] / s['full_seq'][1]:.2f}x)")
    line("  each pass (x loop)", lambda r, s: passes(s["full_seq"][2]))
    line("complete cache: warm random (x loop)", lambda r, s: f"{s['full_rand'][0]['iops']:.0f} ({s['full_rand'][0]['iops'] / s['full_rand'][1]['iops']:.2f}x)")
    line("  each pass (x loop)", lambda r, s: passes(s["full_rand"][2]))
    line("  origin bytes meanwhile", lambda r, s: f"{s['full_origin']}")
    for r, n in cols:
        if "failed" in r["systems"][n]:
            print(f"{n} at {r['delay']} ms: {r['systems'][n]['failed']}")
    print("\ncurl's download rate (median; passes): " + ", ".join(
        f"{r['curl_rate'] / mib:.0f} MiB/s at {r['delay']} ms ({' '.join(f'{x / mib:.0f}' for x in r['curl_rates'])})" for r in runs))
    print("curl beside each system's cold sequential passes (MiB/s): " + ", ".join(
        f"{n} {' '.join(f'{x / mib:.0f}' for x in r['systems'][n]['seq_curl'])} at {r['delay']} ms"
        for r, n in cols if "seq" in r["systems"][n]))
    print("one 4 KiB ranged GET paired with each system's cold random reads (keep-alive, p50 ms): " + ", ".join(
        f"{n} {r['systems'][n]['rand']['get_p50_ms']:.2f} at {r['delay']} ms" for r, n in cols if "rand" in r["systems"][n]))


if __name__ == "__main__":
    main()
