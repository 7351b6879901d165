"""What the benchmark scripts share: paths, commands, waiting, the page cache, timed reads."""

import contextlib, hashlib, json, os, subprocess, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/debug/lazy-image")


def sh(*a, **kw):
    return subprocess.run(a, check=True, **kw)


def wait_for(cond, what, timeout=60):
    t = time.monotonic()
    while not cond():
        if time.monotonic() - t > timeout:
            raise TimeoutError(f"bench: timed out waiting for {what}")
        time.sleep(0.02)


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port):
    import socket

    def up():
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return True
        except OSError:
            return False
    wait_for(up, f"127.0.0.1:{port}")


@contextlib.contextmanager
def lazy_mount(url, mnt, cache, run, lowers=(), extra=()):
    """`lazy-image mount URL MNT` on the FUSE backend (with `--lower` for each of `lowers`, and
    `extra` arguments) for the length of a `with`, unmounted after."""
    os.makedirs(mnt, exist_ok=True)
    argv = [BIN, "mount", url, mnt, "--backend", "fuse", "--cache-dir", cache, "--run-dir", run, *extra]
    for lower in lowers:
        argv += ["--lower", lower]
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.ismount(mnt), "mount")
        yield
    finally:
        sh(BIN, "umount", mnt, "--run-dir", run, stderr=subprocess.DEVNULL)
        proc.wait()


def cache_stats(cache):
    """`lazy-image stat --json` of every image cache under `cache`."""
    return json.loads(subprocess.run([BIN, "stat", "--json", "--cache-dir", cache], capture_output=True, check=True).stdout)


def evict(path):
    """Drops `path`'s pages from the page cache, and only those: a read of it then goes to the
    device below while the files behind the device (a cache) stay in memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def timed_dd(path, wrap=lambda argv: argv, want=None):
    """Seconds `dd` takes to read `path` in 1 MiB reads (its command line passed through
    `wrap`, e.g. into a cgroup); with `want`, the file's SHA-256 must match, checked after the
    clock stops."""
    t = time.monotonic()
    sh(*wrap(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"]))
    secs = time.monotonic() - t
    if want is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
        assert h.hexdigest() == want, f"bench: {path} read wrong bytes"
    return secs


def bench_workdir(name, file_mib, file_name="big.bin"):
    """Builds the binary and makes a work directory under /var/tmp with `srv/` and `tree/`, the
    tree holding `file_name` of `file_mib` MiB of random bytes. Returns (work, srv, tree)."""
    sh("cargo", "build", "-q", "--bin", "lazy-image", cwd=ROOT)
    work = tempfile.mkdtemp(prefix=f"lazy-{name}-bench-", dir="/var/tmp")
    srv, tree = os.path.join(work, "srv"), os.path.join(work, "tree")
    os.makedirs(srv)
    os.makedirs(tree)
    with open(os.path.join(tree, file_name), "wb") as f:
        for _ in range(file_mib):
            f.write(os.urandom(1 << 20))
    return work, srv, tree
