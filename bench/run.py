#!/usr/bin/env python3
"""Compares lazy-image (FUSE+loop) with downloading the image by curl and loop-mounting it, on one
ext4 image served by nginx on 127.0.0.1, with no added latency and with DELAY ms each way.
Every byte read is checked against the source files. Run as root: python3 bench/run.py
Peers still missing: qemu-storage-daemon (http + qcow2 copy-on-read) and nbdkit (curl + cache)."""

import argparse, hashlib, json, os, random, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/debug/lazy-image")


def sh(*a, **kw):
    return subprocess.run(a, check=True, **kw)


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port):
    import socket
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit(f"bench: nothing listens on 127.0.0.1:{port}")


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


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
    h = hashlib.sha256()
    t = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(4 << 20)
            if not b:
                break
            h.update(b)
    dt = time.monotonic() - t
    assert h.hexdigest() == want_sha, f"{path}: wrong bytes"
    return dt


def random_reads(path, src, n, seed):
    rnd = random.Random(seed)
    size = os.path.getsize(path)
    lat = []
    with open(path, "rb", buffering=0) as f, open(src, "rb", buffering=0) as s:
        fd, sfd = f.fileno(), s.fileno()
        for _ in range(n):
            off = rnd.randrange(size // 4096) * 4096
            t = time.monotonic()
            got = os.pread(fd, 4096, off)
            lat.append(time.monotonic() - t)
            assert got == os.pread(sfd, 4096, off), f"{path}@{off}: wrong bytes"
    lat.sort()
    return {"iops": n / sum(lat), "p50_ms": 1000 * lat[n // 2], "p99_ms": 1000 * lat[int(n * 0.99)]}


class Ours:
    def __init__(self, work, url, extra):
        self.work, self.url, self.extra = work, url, extra
        self.mnt = os.path.join(work, "mnt")
        self.cache = os.path.join(work, "cache")
        os.makedirs(self.mnt, exist_ok=True)

    def mount(self, cold):
        if cold:
            sh("rm", "-rf", self.cache)
        self.proc = subprocess.Popen([BIN, "mount", self.url, self.mnt, "--cache-dir", self.cache,
                                      "--run-dir", os.path.join(self.work, "run")] + self.extra, stderr=subprocess.DEVNULL)
        for _ in range(3000):
            if os.path.ismount(self.mnt):
                return
            time.sleep(0.01)
        sys.exit("bench: lazy-image mount did not come up")

    def umount(self):
        sh(BIN, "umount", self.mnt, "--run-dir", os.path.join(self.work, "run"), stderr=subprocess.DEVNULL)
        self.proc.wait()
        out = subprocess.run([BIN, "stat", "--json", "--cache-dir", self.cache], capture_output=True, check=True)
        return sum(i["stats"]["origin_bytes"] for i in json.loads(out.stdout) if i.get("stats"))


def loop_mount(image, mnt):
    dev = subprocess.run(["losetup", "--find", "--show", "--read-only", image], capture_output=True, check=True, text=True).stdout.strip()
    sh("mount", "-o", "ro,noload", dev, mnt)
    return dev


def loop_umount(dev, mnt):
    sh("umount", mnt)
    sh("losetup", "-d", dev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--image-mib", type=int, default=2048)
    ap.add_argument("--seq-mib", type=int, default=512)
    ap.add_argument("--random-reads", type=int, default=2000)
    ap.add_argument("--delay-ms", type=int, default=5)
    ap.add_argument("--chunk-size", default=None, help="lazy-image --chunk-size (default: the engine's)")
    a = ap.parse_args()
    sh("cargo", "build", "-q", "--bin", "lazy-image", cwd=ROOT)
    work = tempfile.mkdtemp(prefix="lazy-bench.")
    tree, srv = os.path.join(work, "tree"), os.path.join(work, "srv")
    os.makedirs(os.path.join(tree, "etc"))
    os.makedirs(srv)
    print(f"bench: building a {a.image_mib} MiB ext4 image in {work}", file=sys.stderr)
    rnd = random.Random(1)
    with open(os.path.join(tree, "seq.bin"), "wb") as f:
        for _ in range(a.seq_mib):
            f.write(rnd.randbytes(1 << 20))
    rand_mib = a.image_mib // 2
    with open(os.path.join(tree, "rand.bin"), "wb") as f:
        for _ in range(rand_mib):
            f.write(rnd.randbytes(1 << 20))
    for i in range(200):
        with open(os.path.join(tree, "etc", f"conf{i}"), "wb") as f:
            f.write(rnd.randbytes(4096))
    image = os.path.join(srv, "bench.img")
    sh("mkfs.ext4", "-q", "-F", "-d", tree, image, f"{a.image_mib}M")
    img_size = os.path.getsize(image)
    seq_sha = hashlib.sha256(open(os.path.join(tree, "seq.bin"), "rb").read()).hexdigest()
    small = os.path.join(tree, "etc", "conf7")
    small_bytes = open(small, "rb").read()

    nginx = Nginx(work, srv)
    rows = []
    try:
        for delay in (0, a.delay_ms):
            port = nginx.port
            proxy = None
            if delay:
                port = free_port()
                proxy = subprocess.Popen([BIN, "proxy", "--listen", f"127.0.0.1:{port}", "--upstream",
                                          f"127.0.0.1:{nginx.port}", "--delay-ms", str(delay)], stderr=subprocess.DEVNULL)
                wait_port(port)
            url = f"http://127.0.0.1:{port}/bench.img"
            r = {"delay": delay}
            # curl + loop: the whole image before the first byte.
            dl = os.path.join(work, "dl.img")
            drop_caches()
            t = time.monotonic()
            sh("curl", "-sSf", "-o", dl, url)
            t_dl = time.monotonic() - t
            mnt = os.path.join(work, "cmnt")
            os.makedirs(mnt, exist_ok=True)
            dev = loop_mount(dl, mnt)
            os.listdir(mnt)
            assert open(os.path.join(mnt, "etc/conf7"), "rb").read() == small_bytes
            r["curl_first_s"] = time.monotonic() - t
            r["curl_rate"] = img_size / t_dl
            loop_umount(dev, mnt)
            os.unlink(dl)
            # ours, cold: first ls + 4 KiB read after attach.
            o = Ours(work, url, ["--chunk-size", a.chunk_size] if a.chunk_size else [])
            o.mount(cold=True)
            t = time.monotonic()
            os.listdir(o.mnt)
            assert open(os.path.join(o.mnt, "etc/conf7"), "rb").read() == small_bytes
            r["ours_first_s"] = time.monotonic() - t
            r["ours_first_origin"] = o.umount()
            # cold sequential
            o.mount(cold=True)
            dt = read_verify(os.path.join(o.mnt, "seq.bin"), seq_sha)
            r["ours_seq_rate"] = a.seq_mib * 2**20 / dt
            o.umount()
            # cold random
            o.mount(cold=True)
            r["ours_rand"] = random_reads(os.path.join(o.mnt, "rand.bin"), os.path.join(tree, "rand.bin"), a.random_reads, 7)
            r["ours_rand_origin"] = o.umount()
            # warm (cache full, page cache dropped)
            subprocess.run([BIN, "warm", url, "--cache-dir", o.cache] + o.extra, check=True, stderr=subprocess.DEVNULL)
            o.mount(cold=False)
            drop_caches()
            r["ours_warm_seq_rate"] = a.seq_mib * 2**20 / read_verify(os.path.join(o.mnt, "seq.bin"), seq_sha)
            drop_caches()
            r["ours_warm_rand"] = random_reads(os.path.join(o.mnt, "rand.bin"), os.path.join(tree, "rand.bin"), a.random_reads, 8)
            o.umount()
            # baseline: the image file itself on a loop device
            dev = loop_mount(image, mnt)
            drop_caches()
            r["loop_seq_rate"] = a.seq_mib * 2**20 / read_verify(os.path.join(mnt, "seq.bin"), seq_sha)
            drop_caches()
            r["loop_rand"] = random_reads(os.path.join(mnt, "rand.bin"), os.path.join(tree, "rand.bin"), a.random_reads, 8)
            loop_umount(dev, mnt)
            if proxy:
                proxy.terminate()
                proxy.wait()
            rows.append(r)
    finally:
        nginx.stop()
        sh("rm", "-rf", work)

    mib = 2**20
    asked = a.random_reads * 4096
    print(f"\nimage {img_size / mib:.0f} MiB ext4, nginx on 127.0.0.1; delays are added each way by `lazy-image proxy`")
    print(f"{'metric':44} " + " ".join(f"{str(r['delay']) + ' ms':>18}" for r in rows))
    def line(name, f):
        print(f"{name:44} " + " ".join(f"{f(r):>18}" for r in rows))
    line("curl download+mount, first ls+4K read (s)", lambda r: f"{r['curl_first_s']:.2f}")
    line("ours first ls+4K read (s)", lambda r: f"{r['ours_first_s']:.3f}")
    line("ours first-read origin bytes (% image)", lambda r: f"{100 * r['ours_first_origin'] / img_size:.3f}%")
    line("cold sequential MiB/s: ours / curl", lambda r: f"{r['ours_seq_rate'] / mib:.0f}/{r['curl_rate'] / mib:.0f} = {r['ours_seq_rate'] / r['curl_rate']:.2f}x")
    line("cold random 4K: IOPS", lambda r: f"{r['ours_rand']['iops']:.0f}")
    line("cold random 4K: p50 / p99 ms", lambda r: f"{r['ours_rand']['p50_ms']:.2f}/{r['ours_rand']['p99_ms']:.2f}")
    line("cold random 4K: origin bytes / asked", lambda r: f"{r['ours_rand_origin'] / asked:.1f}x")
    line("warm sequential: ours / loop on file", lambda r: f"{r['ours_warm_seq_rate'] / r['loop_seq_rate']:.2f}x")
    line("warm random IOPS: ours / loop on file", lambda r: f"{r['ours_warm_rand']['iops'] / r['loop_rand']['iops']:.2f}x")


if __name__ == "__main__":
    main()
