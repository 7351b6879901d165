//! Helpers and the shared suite of the end-to-end tests of the real `lazy-image` binary. The
//! suite functions take an `Env` bound to one block backend and are called from each backend's
//! test file: `e2e_mount.rs` (FUSE + loop, on the host) and `e2e_ublk.rs` (ublk, in the VM).
#![allow(dead_code)]

pub mod registry;

use rand::RngCore;
use rand::SeedableRng;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_lazy-image");

/// True when the tools these tests need are here. In CI a missing one fails the test instead of
/// skipping it silently.
pub fn prerequisites_met(extra: &[(&'static str, bool)]) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut checks =
        vec![("root", root), ("mkfs.ext4", which("mkfs.ext4")), ("mkfs.erofs", which("mkfs.erofs")), ("mksquashfs", which("mksquashfs"))];
    checks.extend_from_slice(extra);
    let missing: Vec<&str> = checks.into_iter().filter(|(_, ok)| !ok).map(|(n, _)| n).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must provide: {missing:?} (see scripts/install-deps.sh)");
    eprintln!("skipping: missing {missing:?}");
    false
}

pub fn which(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

pub fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A source tree with a few files of random content, returning name -> sha256.
pub fn make_tree(dir: &Path, seed: u64, sizes: &[usize]) -> BTreeMap<String, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sums = BTreeMap::new();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for (i, &n) in sizes.iter().enumerate() {
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        let name = if i % 2 == 0 { format!("file{i}.bin") } else { format!("sub/file{i}.bin") };
        std::fs::write(dir.join(&name), &v).unwrap();
        sums.insert(name, hex::encode(Sha256::digest(&v)));
    }
    sums
}

pub fn make_image(fs: &str, tree: &Path, out: &Path) {
    match fs {
        "ext4" => sh(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(tree).arg(out).arg("96M")),
        "erofs" => sh(Command::new("mkfs.erofs").arg("--quiet").arg(out).arg(tree)),
        "squashfs" => sh(Command::new("mksquashfs").arg(tree).arg(out).args(["-noappend", "-quiet", "-no-progress"])),
        _ => unreachable!(),
    }
}

/// A served directory, a cache and a run directory, and the backend mounts use.
pub struct Env {
    // Fields drop in order: the server stops before its directory is removed.
    _server: KillOnDrop,
    pub tmp: tempfile::TempDir,
    pub base: String,
    pub port: u16,
    pub backend: &'static str,
}

impl Env {
    pub fn new(backend: &'static str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("srv")).unwrap();
        let port = free_port();
        let server = Command::new(BIN)
            .args(["serve"])
            .arg(tmp.path().join("srv"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "server start");
        Env { _server: KillOnDrop::new(server), tmp, base: format!("http://127.0.0.1:{port}"), port, backend }
    }

    /// How the mount log must say the FUSE backend talks to the kernel: over io_uring wherever
    /// the kernel offers it (the fuse module's `enable_uring`), unless told not to.
    pub fn fuse_transport(&self) -> Option<&'static str> {
        let offered = std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y");
        match self.backend {
            "fuse" if offered => Some("(FUSE over io_uring)"),
            "fuse" | "fuse-dev" => Some("(FUSE over /dev/fuse)"),
            _ => None,
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// Starts `lazy-image mount` (appending its stderr to `<mnt>.log`) without waiting.
    pub fn spawn_mount(&self, url: &str, mnt: &str, extra: &[&str]) -> Child {
        self.spawn_mount_env(url, mnt, extra, &[])
    }

    /// `spawn_mount` with variables added to the daemon's environment.
    pub fn spawn_mount_env(&self, url: &str, mnt: &str, extra: &[&str], env: &[(&str, &str)]) -> Child {
        std::fs::create_dir_all(self.p(mnt)).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.p(&format!("{mnt}.log"))).unwrap();
        Command::new(BIN)
            .arg("mount")
            .arg(url)
            .arg(self.p(mnt))
            .arg("--cache-dir")
            .arg(self.p("cache"))
            .arg("--run-dir")
            .arg(self.p("run"))
            // "fuse-dev": the FUSE backend kept to /dev/fuse where the kernel offers io_uring.
            .args(["--backend", if self.backend == "fuse-dev" { "fuse" } else { self.backend }])
            .env("LAZY_IMAGE_FUSE_IO_URING", if self.backend == "fuse-dev" { "0" } else { "1" })
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Starts `lazy-image mount` and returns once it is fully up: mounted and its run record
    /// written (the daemon says "mounted" only after both), so a kill right after is recoverable.
    pub fn mount(&self, url: &str, mnt: &str, extra: &[&str]) -> Child {
        self.mount_env(url, mnt, extra, &[])
    }

    /// `mount` with variables added to the daemon's environment.
    pub fn mount_env(&self, url: &str, mnt: &str, extra: &[&str], env: &[(&str, &str)]) -> Child {
        let mounted_lines = || self.log(mnt).matches("lazy-image: mounted ").count();
        let before = mounted_lines();
        let mut child = self.spawn_mount_env(url, mnt, extra, env);
        let mp = self.p(mnt);
        wait_for(
            || {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!("mount exited with {st}: {}", self.log(mnt));
                }
                lazy_mounted(&mp) && mounted_lines() > before
            },
            "mount",
        );
        child
    }

    pub fn log(&self, mnt: &str) -> String {
        std::fs::read_to_string(self.p(&format!("{mnt}.log"))).unwrap_or_default()
    }

    pub fn umount(&self, mnt: &str, mut child: Child) {
        let out = Command::new(BIN).arg("umount").arg(self.p(mnt)).arg("--run-dir").arg(self.p("run")).output().unwrap();
        assert!(out.status.success(), "umount: {}\ndaemon log:\n{}", String::from_utf8_lossy(&out.stderr), self.log(mnt));
        assert!(child.wait().unwrap().success(), "daemon log:\n{}", self.log(mnt));
        assert!(!lazy_mounted(&self.p(mnt)));
    }

    pub fn stat(&self) -> serde_json::Value {
        let out = Command::new(BIN).args(["stat", "--json", "--cache-dir"]).arg(self.p("cache")).output().unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A proxy in front of the server: `delay_ms` each way and `rate` per connection.
    pub fn slow_proxy(&self, delay_ms: u32, rate: &str) -> (KillOnDrop, String) {
        let port = free_port();
        let proxy = Command::new(BIN)
            .args(["proxy", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("127.0.0.1:{}", self.port)])
            .args(["--delay-ms", &delay_ms.to_string(), "--rate", rate])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "proxy");
        (KillOnDrop::new(proxy), format!("http://127.0.0.1:{port}"))
    }
}

/// A measured figure: printed, and appended to $LAZY_IMAGE_RESULTS when set (the VM harness
/// shows that file on the host, as passing tests' output is captured).
pub fn report(line: &str) {
    eprintln!("RESULT {line}");
    if let Some(path) = std::env::var_os("LAZY_IMAGE_RESULTS") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn lazy_mounted(mp: &Path) -> bool {
    lazy_image_attach::is_mountpoint(mp).unwrap()
}

pub fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Mounts a one-file `fs` image named after `mnt`; returns the daemon and the device mounted.
pub fn mount_small_image(env: &Env, fs: &str, mnt: &str) -> (Child, PathBuf) {
    make_tree(&env.p("tree"), 5, &[1 << 20]);
    make_image(fs, &env.p("tree"), &env.p(&format!("srv/{mnt}.img")));
    let child = env.mount(&format!("{}/{mnt}.img", env.base), mnt, &[]);
    let dev = lazy_image_attach::mount_source(&env.p(mnt)).unwrap().expect("mounted from a device");
    (child, dev)
}

pub fn check_sums(root: &Path, sums: &BTreeMap<String, String>) {
    for (name, want) in sums {
        let got = hex::encode(Sha256::digest(std::fs::read(root.join(name)).unwrap()));
        assert_eq!(&got, want, "{name}");
    }
}

/// Kills a helper process (server, proxy, daemon) even when the test fails: a leaked child would
/// hold the test's output pipe open.
pub struct KillOnDrop(Option<Child>);

impl KillOnDrop {
    pub fn new(child: Child) -> Self {
        KillOnDrop(Some(child))
    }

    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child present until released")
    }

    /// Hands the child back without killing it (e.g. to let `umount` stop it cleanly).
    pub fn release(mut self) -> Child {
        self.0.take().expect("child present until released")
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- The suite every backend runs ----

/// ext4, erofs and squashfs images mount read-only, every file's checksum matches, writes fail.
pub fn three_filesystems(env: &Env) {
    let sums = make_tree(&env.p("tree"), 1, &[1 << 20, 5 << 20, 123_457, 7 << 20]);
    for fs in ["ext4", "erofs", "squashfs"] {
        make_image(fs, &env.p("tree"), &env.p(&format!("srv/{fs}.img")));
        let child = env.mount(&format!("{}/{fs}.img", env.base), fs, &[]);
        if let Some(via) = env.fuse_transport() {
            assert!(env.log(fs).contains(via), "expected {via}: {}", env.log(fs));
        }
        check_sums(&env.p(fs), &sums);
        // Read-only all the way down.
        assert!(std::fs::write(env.p(&format!("{fs}/new")), b"x").is_err());
        env.umount(fs, child);
    }
}

/// Listing and reading one small file fetches a small part of the image; a second attach of
/// the same image is served from the warm cache.
pub fn partial_read_and_warm_reuse(env: &Env) {
    let sums = make_tree(&env.p("tree"), 2, &[4096, 40 << 20, 3000]);
    make_image("ext4", &env.p("tree"), &env.p("srv/part.img"));
    let url = format!("{}/part.img", env.base);
    let size = std::fs::metadata(env.p("srv/part.img")).unwrap().len();

    let child = env.mount(&url, "m", &[]);
    let small = std::fs::read(env.p("m/file0.bin")).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&small)), sums["file0.bin"]);
    env.umount("m", child);
    let first = env.stat()[0]["stats"]["origin_bytes"].as_u64().unwrap();
    assert!(first < size / 20, "listing and one small file fetched {first} of {size} bytes");

    let child = env.mount(&url, "m", &[]);
    std::fs::read(env.p("m/file0.bin")).unwrap();
    env.umount("m", child);
    assert_eq!(env.stat()[0]["stats"]["origin_bytes"].as_u64().unwrap(), 0, "warm attach fetched nothing");
}

/// A chunk that does not match the pinned manifest is an I/O error for its reader, never its
/// bytes; the rest of the image still reads correctly.
pub fn corrupt_chunk_is_eio(env: &Env) {
    let tree = env.p("ctree");
    std::fs::create_dir_all(&tree).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut victim = vec![0u8; 4 << 20];
    rng.fill_bytes(&mut victim);
    std::fs::write(tree.join("victim.bin"), &victim).unwrap();
    std::fs::write(tree.join("ok.txt"), b"fine\n").unwrap();
    let img = env.p("srv/corrupt.img");
    make_image("erofs", &tree, &img);
    let out = Command::new(BIN).args(["manifest", "build"]).arg(&img).output().unwrap();
    assert!(out.status.success());
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
    // Flip bytes inside victim.bin's data in the served image (found by its content).
    let mut bytes = std::fs::read(&img).unwrap();
    let at = bytes.windows(64).position(|w| w == &victim[1 << 20..(1 << 20) + 64]).expect("file data in the image");
    for b in &mut bytes[at..at + 16] {
        *b ^= 0x5a;
    }
    std::fs::write(&img, &bytes).unwrap();

    let child = env.mount(&format!("{}/corrupt.img", env.base), "c", &["--digest", &digest]);
    assert_eq!(std::fs::read(env.p("c/ok.txt")).unwrap(), b"fine\n");
    let err = std::fs::read(env.p("c/victim.bin")).expect_err("corrupt data must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    env.umount("c", child);
}

/// A cache disk with no room left: the mount still serves every byte right (fetched again
/// from the origin), says why it is not caching, and unmounts cleanly.
pub fn full_cache_disk_keeps_serving(env: &Env) {
    let sums = make_tree(&env.p("ftree"), 6, &[6 << 20]);
    make_image("erofs", &env.p("ftree"), &env.p("srv/full.img"));
    let cache = env.p("cache");
    std::fs::create_dir_all(&cache).unwrap();
    sh(Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "lazy-image-test"]).arg(&cache));
    let _tmpfs = UnmountOnDrop(cache);
    let child = env.mount(&format!("{}/full.img", env.base), "f", &[]);
    check_sums(&env.p("f"), &sums);
    env.umount("f", child);
    let log = env.log("f");
    assert!(log.contains("No space left on device") && log.contains("served without being cached"), "{log}");
}

/// Lazily unmounts a filesystem a test mounted, even when the test fails.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A node-local source: a block device (a loop device over the image) is read once, the second
/// mount takes everything from the cache; a file rewritten under a mounted volume fails reads of
/// what is not cached (EIO) and keeps serving what is, never mixing the two versions.
pub fn local_sources_read_once_and_refuse_a_changed_source(env: &Env) {
    let sums = make_tree(&env.p("ltree"), 9, &[300_000, 24 << 20]);
    std::fs::create_dir_all(env.p("local")).unwrap();
    let img = env.p("local/src.img");
    make_image("ext4", &env.p("ltree"), &img);
    let out = Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(&img).output().unwrap();
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let dev = Detach(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let origin_of = |url: &str| {
        let all = env.stat();
        all.as_array().unwrap().iter().find(|c| c["url"] == url).unwrap_or_else(|| panic!("no cache for {url}: {all}"))["stats"]
            ["origin_bytes"]
            .as_u64()
            .unwrap()
    };
    for pass in 0..2 {
        let child = env.mount(&dev.0, "dev", &[]);
        check_sums(&env.p("dev"), &sums);
        env.umount("dev", child);
        let fetched = origin_of(&dev.0);
        if pass == 0 {
            assert!(fetched > 24 << 20, "the first mount read the device: {fetched}");
        } else {
            assert_eq!(fetched, 0, "the second mount read nothing from the device");
        }
    }
    drop(dev);

    let url = format!("file://{}", img.display());
    let child = env.mount(&url, "file", &[]);
    let small = std::fs::read(env.p("file/file0.bin")).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&small)), sums["file0.bin"]);
    // Rewrite the image in place (same inode and size, another mtime): the last MiB of file1,
    // far from anything read so far (or read ahead).
    let mut bytes = std::fs::read(&img).unwrap();
    let big = std::fs::read(env.p("ltree/sub/file1.bin")).unwrap();
    let tail = &big[big.len() - (1 << 20)..];
    let at = bytes.windows(64).position(|w| w == &tail[..64]).expect("file1's data in the image");
    for b in &mut bytes[at..at + (1 << 20)] {
        *b ^= 0xa5;
    }
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0).unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    drop(f);
    let err = std::fs::read(env.p("file/sub/file1.bin")).expect_err("bytes of a changed source must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    let again = std::fs::read(env.p("file/file0.bin")).unwrap();
    assert_eq!(hex::encode(Sha256::digest(&again)), sums["file0.bin"], "what was cached is served as it was");
    env.umount("file", child);
}

/// qcow2 images over HTTP, made by qemu-img: a zstd-compressed copy of an ext4 image, and a
/// qcow2 over the raw image as its backing file (named relative to it) holding one changed
/// block of a file. Each mounts and every file reads right.
pub fn qcow2_images_mount(env: &Env) {
    if !which("qemu-img") {
        assert!(std::env::var_os("CI").is_none(), "CI must provide qemu-img (qemu-utils)");
        eprintln!("skipping: no qemu-img");
        return;
    }
    let mut sums = make_tree(&env.p("qtree"), 21, &[200_000, 3 << 20]);
    let srv = env.p("srv");
    make_image("ext4", &env.p("qtree"), &srv.join("base.img"));
    let qemu_img = |args: &[&str]| sh(Command::new("qemu-img").args(args).current_dir(&srv));
    qemu_img(&["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "base.img", "packed.qcow2"]);
    let child = env.mount(&format!("{}/packed.qcow2", env.base), "packed", &[]);
    check_sums(&env.p("packed"), &sums);
    env.umount("packed", child);

    let (bytes, at, sum) = change_file_in_image(&srv.join("base.img"), &env.p("qtree/file0.bin"), 4096, 0x3c);
    std::fs::write(env.p("piece.bin"), &bytes[at..at + 4096]).unwrap();
    sums.insert("file0.bin".into(), sum);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "raw", "top.qcow2"]);
    let write = format!("write -s {} {at} 4096", env.p("piece.bin").display());
    sh(Command::new("qemu-io").args(["-f", "qcow2", "-c", &write, "top.qcow2"]).current_dir(&srv));
    assert!(std::fs::metadata(srv.join("top.qcow2")).unwrap().len() < 1 << 20, "the overlay holds only what changed");
    let child = env.mount(&format!("{}/top.qcow2", env.base), "top", &[]);
    check_sums(&env.p("top"), &sums);
    env.umount("top", child);
}

/// Flips `len` bytes of `file`'s data where it lies in the filesystem image `image` (found by
/// its first 64 bytes), as a writer changing the file in place would: returns the changed image
/// (the file on disk is left alone), where the change starts, and the SHA-256 the file has in it.
pub fn change_file_in_image(image: &Path, file: &Path, len: usize, x: u8) -> (Vec<u8>, usize, String) {
    let mut bytes = std::fs::read(image).unwrap();
    let mut data = std::fs::read(file).unwrap();
    let at = bytes.windows(64).position(|w| w == &data[..64]).expect("the file's data in the image");
    for (b, f) in bytes[at..at + len].iter_mut().zip(data.iter_mut()) {
        *b ^= x;
        *f ^= x;
    }
    (bytes, at, hex::encode(Sha256::digest(&data)))
}

/// `lazy-image convert ARGS` in `dir`; its output.
pub fn convert(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN).arg("convert").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "convert {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// OverlayBD layers from `lazy-image convert`: a base layer and a zstd ZFile diff layer of the
/// same ext4 with one file's data changed, served over HTTP and mounted as a stack.
pub fn overlaybd_layers_mount(env: &Env) {
    let mut sums = make_tree(&env.p("otree"), 23, &[200_000, 3 << 20]);
    let srv = env.p("srv");
    make_image("ext4", &env.p("otree"), &srv.join("base.img"));
    let (bytes, _, sum) = change_file_in_image(&srv.join("base.img"), &env.p("otree/file0.bin"), 8192, 0x5a);
    std::fs::write(srv.join("new.img"), &bytes).unwrap();
    sums.insert("file0.bin".into(), sum);
    let convert = |args: &[&str]| convert(&srv, args);
    convert(&["base.img", "base.lsmt"]);
    let said = convert(&["new.img", "new.zfile", "--base", "base.img", "--compress", "zstd", "--block-size", "16K"]);
    assert!(said.contains("OverlayBD layer") && said.contains(", on layer "), "{said}");
    assert!(std::fs::metadata(srv.join("new.zfile")).unwrap().len() < 64 << 10, "the diff layer holds only what changed");
    let out = Command::new(BIN)
        .args(["convert", "new.img", "x.zfile", "--compress", "lz4", "--block-size", "64K"])
        .current_dir(&srv)
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("4K to 32K"), "{out:?}");

    let lower = format!("{}/base.lsmt", env.base);
    let child = env.mount(&format!("{}/new.zfile", env.base), "stack", &["--lower", &lower]);
    check_sums(&env.p("stack"), &sums);
    env.umount("stack", child);
}

/// Registry images on a real registry: an OverlayBD stack (converted base + zstd diff layer)
/// and a single-blob ext4 artifact, mounted by tag and by digest; a second image on the same
/// base layer in another repository reads that layer from the cache the first one filled; and
/// a registry behind credentials refuses a mount without them and serves one with them.
pub fn registry_images_mount(env: &Env) {
    use registry::*;
    let oras = oras_python();
    if !which("docker-registry") || !which("skopeo") || !which("htpasswd") || oras.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide docker-registry, skopeo, htpasswd (apache2-utils) and oras in target/registry-venv (scripts/test.sh)"
        );
        eprintln!("skipping: docker-registry, skopeo, htpasswd or target/registry-venv's oras missing");
        return;
    }
    let mut sums = make_tree(&env.p("rtree"), 31, &[150_000, 2 << 20]);
    let work = env.p("rwork");
    std::fs::create_dir_all(&work).unwrap();
    make_image("ext4", &env.p("rtree"), &work.join("base.img"));
    let base_sums = sums.clone();
    let (bytes, _, sum) = change_file_in_image(&work.join("base.img"), &env.p("rtree/file0.bin"), 4096, 0xa5);
    std::fs::write(work.join("v2.img"), &bytes).unwrap();
    sums.insert("file0.bin".into(), sum);
    let convert = |args: &[&str]| convert(&work, args);
    convert(&["base.img", "base.layer", "--compress", "lz4"]);
    convert(&["v2.img", "v2.layer", "--base", "base.img", "--compress", "zstd"]);
    convert(&["v2.img", "v2b.layer", "--base", "base.img"]);
    let tar = "application/vnd.oci.image.layer.v1.tar";

    let reg = Registry::start(&env.p("registry"), false);
    write_layout(&work.join("stack"), &[work.join("base.layer"), work.join("v2.layer")], tar, true);
    reg.push(&work.join("stack"), "team/stack:v2");
    let flat = write_layout(&work.join("flat"), &[work.join("base.img")], "application/vnd.lazy-image.ext4", false);
    reg.push(&work.join("flat"), "team/flat:v1");
    write_layout(&work.join("other"), &[work.join("base.layer"), work.join("v2b.layer")], tar, true);
    reg.push(&work.join("other"), "elsewhere/other:v1");

    let child = env.mount(&reg.reference("team/stack:v2"), "rstack", &[]);
    check_sums(&env.p("rstack"), &sums);
    env.umount("rstack", child);
    assert!(env.log("rstack").contains("(2 OverlayBD layers)"), "{}", env.log("rstack"));

    let child = env.mount(&format!("{}@{flat}", reg.reference("team/flat")), "rflat", &[]);
    check_sums(&env.p("rflat"), &base_sums);
    env.umount("rflat", child);
    // A data set published with ORAS: a single-blob artifact, mounted as it is.
    std::fs::copy(work.join("v2.img"), work.join("model.img")).unwrap();
    reg.oras_push(oras.as_deref().unwrap(), &work.join("model.img"), "data/model:v1");
    let child = env.mount(&reg.reference("data/model:v1"), "roras", &[]);
    check_sums(&env.p("roras"), &sums);
    env.umount("roras", child);

    // The base layer's blob is cached once, under its digest: the other image reads it from
    // there and fetches only its own top layer.
    let base_digest = format!("sha256:{}", sha256_hex(&std::fs::read(work.join("base.layer")).unwrap()));
    let base_cache = registry::blob_cache(&env.p("cache"), &base_digest);
    // Each mount's counters: (bytes fetched from the registry, reads served) of the layer.
    let counters = || -> (u64, u64) {
        let raw = std::fs::read(base_cache.join("stats.json")).unwrap_or_else(|e| panic!("{}: {e}", base_cache.display()));
        let stats: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        (stats["origin_bytes"].as_u64().unwrap(), stats["reads"].as_u64().unwrap())
    };
    assert!(counters().0 > 0, "the first image read its base layer through {}", base_cache.display());
    let child = env.mount(&reg.reference("elsewhere/other:v1"), "rother", &[]);
    check_sums(&env.p("rother"), &sums);
    env.umount("rother", child);
    let (fetched, reads) = counters();
    assert!(reads > 0, "the second image read the shared base layer");
    assert_eq!(fetched, 0, "the second image fetched none of the base layer's cached bytes again");

    // Behind credentials: refused without them, served with them (from the environment).
    let locked = Registry::start(&env.p("registry-auth"), true);
    locked.push(&work.join("stack"), "team/stack:v2");
    let mut denied = env.spawn_mount(&locked.reference("team/stack:v2"), "rdenied", &[]);
    assert!(!denied.wait().unwrap().success());
    let said = env.log("rdenied");
    assert!(said.contains("wants a user and password"), "{said}");
    let creds = [("LAZY_IMAGE_REGISTRY_USER", USER), ("LAZY_IMAGE_REGISTRY_PASSWORD", PASSWORD)];
    let child = env.mount_env(&locked.reference("team/stack:v2"), "rauth", &[], &creds);
    check_sums(&env.p("rauth"), &sums);
    env.umount("rauth", child);
    assert!(!env.log("rauth").contains(PASSWORD), "the password never reaches the log");
}

/// Flushes a filesystem's writes to its device (`syncfs`): an error there is a write the device
/// refused.
pub fn syncfs(dir: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops the clean pages of every file under `root` from the page cache, so the next reads come
/// from the device. (Not `drop_caches`: dropping every cache at once makes unmounts running
/// beside it fail with EBUSY now and then.)
pub fn evict_tree(root: &Path) {
    use std::os::fd::AsRawFd;
    for e in std::fs::read_dir(root).unwrap().flatten() {
        let path = e.path();
        if e.file_type().unwrap().is_dir() {
            if e.file_name() != "lost+found" {
                evict_tree(&path);
            }
            continue;
        }
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: fadvise on a descriptor we own; no memory is passed.
        assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    }
}

/// `--writable`: an ext4 image mounts read-write; files written, appended and deleted read back
/// from the device (page cache dropped); a writable mount after unmount sees the original files; the image and its cache are never
/// written; a full layer fails writes (the layer's ENOSPC) but not reads; a read-only
/// filesystem is refused with a sentence.
pub fn writable_layer(env: &Env) {
    let sums = make_tree(&env.p("tree"), 21, &[3 << 20, 100_000, 1 << 20]);
    make_image("ext4", &env.p("tree"), &env.p("srv/rw.img"));
    let url = format!("{}/rw.img", env.base);
    let image_sum = hex::encode(Sha256::digest(std::fs::read(env.p("srv/rw.img")).unwrap()));
    let child = env.mount(&url, "w", &["--writable", "--writable-size", "24M"]);
    assert!(env.log("w").contains("mounted ext4 read-write"), "{}", env.log("w"));
    if let Some(via) = env.fuse_transport() {
        assert!(env.log("w").contains(via), "expected {via}: {}", env.log("w"));
    }
    check_sums(&env.p("w"), &sums);
    let fresh = make_tree(&env.p("fresh"), 22, &[5 << 20, 4097]);
    let new_name = |name: &str| format!("w/new-{}", name.replace('/', "-"));
    for name in fresh.keys() {
        std::fs::copy(env.p(&format!("fresh/{name}")), env.p(&new_name(name))).unwrap();
    }
    let mut appended = std::fs::read(env.p("w/sub/file1.bin")).unwrap();
    appended.extend_from_slice(b"appended through the writable layer");
    std::fs::write(env.p("w/sub/file1.bin"), &appended).unwrap();
    std::fs::remove_file(env.p("w/file2.bin")).unwrap();
    syncfs(&env.p("w")).expect("the layer takes the writes");
    evict_tree(&env.p("w"));
    for (name, want) in &fresh {
        assert_eq!(&hex::encode(Sha256::digest(std::fs::read(env.p(&new_name(name))).unwrap())), want, "{name}");
    }
    assert!(std::fs::read(env.p("w/sub/file1.bin")).unwrap() == appended);
    assert!(!env.p("w/file2.bin").exists());
    check_sums(&env.p("w"), &BTreeMap::from([("file0.bin".to_string(), sums["file0.bin"].clone())]));

    // Past the layer's 24 MiB: the device refuses the write, and reads go on.
    let big = vec![0x5au8; 32 << 20];
    let res = std::fs::write(env.p("w/big"), &big).and_then(|()| syncfs(&env.p("w")));
    assert!(res.is_err(), "writing past the layer's size must fail");
    assert!(env.log("w").contains("the writable layer is full"), "{}", env.log("w"));
    evict_tree(&env.p("w"));
    check_sums(&env.p("w"), &BTreeMap::from([("file0.bin".to_string(), sums["file0.bin"].clone())]));
    env.umount("w", child);
    let layers = env.p("run/layers");
    assert!(std::fs::read_dir(&layers).map_or(true, |mut d| d.next().is_none()), "the layer is dropped at unmount");

    // The next writable mount starts from the image again; the image was never written.
    let child = env.mount(&url, "w", &["--writable"]);
    check_sums(&env.p("w"), &sums);
    assert!(!env.p("w/new-file0.bin").exists());
    env.umount("w", child);
    assert_eq!(hex::encode(Sha256::digest(std::fs::read(env.p("srv/rw.img")).unwrap())), image_sum);
    let st = env.stat();
    assert_eq!(st[0]["stats"]["verify_failures"].as_u64().unwrap_or(0), 0);

    // erofs cannot be mounted read-write: refused with a sentence.
    make_image("erofs", &env.p("tree"), &env.p("srv/ro.img"));
    std::fs::create_dir_all(env.p("e")).unwrap();
    let out = Command::new(BIN)
        .arg("mount")
        .arg(format!("{}/ro.img", env.base))
        .arg(env.p("e"))
        .args(["--writable", "--backend", if env.backend == "fuse-dev" { "fuse" } else { env.backend }])
        .arg("--cache-dir")
        .arg(env.p("cache"))
        .arg("--run-dir")
        .arg(env.p("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a read-only filesystem: a writable volume needs ext4"), "{err}");
    assert!(!lazy_mounted(&env.p("e")));
}
