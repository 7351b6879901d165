//! End-to-end: the real `lazy-image` binary serving, mounting (FUSE + loop), reading, unmounting.
//! Needs root, /dev/fuse, losetup and the mkfs tools; when CI=true a missing one is a failure.

use rand::{Rng, RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lazy-image");

fn prerequisites_met() -> bool {
    let missing: Vec<&str> = [
        ("/dev/fuse", Path::new("/dev/fuse").exists()),
        ("root", unsafe { libc::geteuid() } == 0),
        ("mkfs.ext4", which("mkfs.ext4")),
        ("mkfs.erofs", which("mkfs.erofs")),
        ("mksquashfs", which("mksquashfs")),
        ("losetup", which("losetup")),
    ]
    .into_iter()
    .filter(|(_, ok)| !ok)
    .map(|(n, _)| n)
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must provide: {missing:?} (see scripts/install-deps.sh)");
    eprintln!("skipping: missing {missing:?}");
    false
}

fn which(cmd: &str) -> bool {
    Command::new("sh").arg("-c").arg(format!("command -v {cmd}")).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A source tree with a few files of random content, returning name -> sha256.
fn make_tree(dir: &Path, seed: u64, sizes: &[usize]) -> BTreeMap<String, String> {
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

fn make_image(fs: &str, tree: &Path, out: &Path) {
    match fs {
        "ext4" => sh(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(tree).arg(out).arg("96M")),
        "erofs" => sh(Command::new("mkfs.erofs").arg("--quiet").arg(out).arg(tree)),
        "squashfs" => sh(Command::new("mksquashfs").arg(tree).arg(out).args(["-noappend", "-quiet", "-no-progress"])),
        _ => unreachable!(),
    }
}

struct Env {
    // Fields drop in order: the server stops before its directory is removed.
    _server: KillOnDrop,
    tmp: tempfile::TempDir,
    base: String,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("srv")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = Command::new(BIN)
            .args(["serve"])
            .arg(tmp.path().join("srv"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "server start");
        Env { _server: KillOnDrop(server), tmp, base: format!("http://127.0.0.1:{port}") }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn mount(&self, url: &str, mnt: &str, extra: &[&str]) -> Child {
        std::fs::create_dir_all(self.p(mnt)).unwrap();
        let log = std::fs::File::create(self.p(&format!("{mnt}.log"))).unwrap();
        let child = Command::new(BIN)
            .arg("mount")
            .arg(url)
            .arg(self.p(mnt))
            .arg("--cache-dir")
            .arg(self.p("cache"))
            .arg("--run-dir")
            .arg(self.p("run"))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mp = self.p(mnt);
        wait_for(|| lazy_mounted(&mp), "mount");
        child
    }

    fn umount(&self, mnt: &str, mut child: Child) {
        let out = Command::new(BIN).arg("umount").arg(self.p(mnt)).arg("--run-dir").arg(self.p("run")).output().unwrap();
        let log = std::fs::read_to_string(self.p(&format!("{mnt}.log"))).unwrap_or_default();
        assert!(out.status.success(), "umount: {}\ndaemon log:\n{log}", String::from_utf8_lossy(&out.stderr));
        assert!(child.wait().unwrap().success());
        assert!(!lazy_mounted(&self.p(mnt)));
    }

    fn stat(&self) -> serde_json::Value {
        let out = Command::new(BIN).args(["stat", "--json", "--cache-dir"]).arg(self.p("cache")).output().unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

fn lazy_mounted(mp: &Path) -> bool {
    lazy_image_attach::is_mountpoint(mp).unwrap()
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn loop_devices_on(cache: &Path) -> usize {
    let out = Command::new("losetup").arg("-a").output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(cache.to_str().unwrap())).count()
}

fn check_sums(root: &Path, sums: &BTreeMap<String, String>) {
    for (name, want) in sums {
        let got = hex::encode(Sha256::digest(std::fs::read(root.join(name)).unwrap()));
        assert_eq!(&got, want, "{name}");
    }
}

#[test]
fn ext4_erofs_squashfs_mount_read_umount() {
    if !prerequisites_met() {
        return;
    }
    let env = Env::new();
    let sums = make_tree(&env.p("tree"), 1, &[1 << 20, 5 << 20, 123_457, 7 << 20]);
    for fs in ["ext4", "erofs", "squashfs"] {
        make_image(fs, &env.p("tree"), &env.p(&format!("srv/{fs}.img")));
        let child = env.mount(&format!("{}/{fs}.img", env.base), fs, &[]);
        check_sums(&env.p(fs), &sums);
        // Read-only all the way down.
        assert!(std::fs::write(env.p(&format!("{fs}/new")), b"x").is_err());
        env.umount(fs, child);
    }
    assert_eq!(loop_devices_on(&env.p("cache")), 0, "no loop device left behind");
}

#[test]
fn partial_read_fetches_little_and_warm_cache_is_reused() {
    if !prerequisites_met() {
        return;
    }
    let env = Env::new();
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

    // Second attach: the same reads come from the warm cache.
    let child = env.mount(&url, "m", &[]);
    std::fs::read(env.p("m/file0.bin")).unwrap();
    env.umount("m", child);
    assert_eq!(env.stat()[0]["stats"]["origin_bytes"].as_u64().unwrap(), 0, "warm attach fetched nothing");
}

#[test]
fn digest_pinned_mount_and_bad_inputs() {
    if !prerequisites_met() {
        return;
    }
    let env = Env::new();
    let sums = make_tree(&env.p("tree"), 3, &[2 << 20]);
    make_image("erofs", &env.p("tree"), &env.p("srv/pin.img"));
    let out = Command::new(BIN).args(["manifest", "build"]).arg(env.p("srv/pin.img")).output().unwrap();
    assert!(out.status.success());
    let digest = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    let url = format!("{}/pin.img", env.base);
    let child = env.mount(&url, "p", &["--digest", &digest]);
    check_sums(&env.p("p"), &sums);
    env.umount("p", child);

    let fail = |args: &[&str], expect: &str| {
        std::fs::create_dir_all(env.p("bad")).unwrap();
        let out = Command::new(BIN)
            .args(args)
            .args(["--cache-dir", env.p("cache2").to_str().unwrap(), "--run-dir", env.p("run").to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in {err:?}");
        assert!(!lazy_mounted(&env.p("bad")));
    };
    let bad = env.p("bad");
    let bad = bad.to_str().unwrap();
    fail(&["mount", &format!("{}/missing.img", env.base), bad], "HTTP 404");
    fail(&["mount", &url, bad, "--digest", &format!("sha256:{}", "0".repeat(64))], "manifest digest");
    fail(&["mount", &url, bad, "--digest", "md5:1"], "must start with \"sha256:\"");
    fail(&["mount", &url, bad, "--format", "xfs"], "unknown filesystem format");
    fail(&["mount", "ftp://example.invalid/x", bad], "must be http");
    std::fs::write(env.p("srv/zeros.img"), vec![0u8; 1 << 20]).unwrap();
    fail(&["mount", &format!("{}/zeros.img", env.base), bad], "not an ext4, erofs or squashfs");
    fail(&["mount", &url, env.p("srv/pin.img").to_str().unwrap()], "not a directory");
}

/// kill -9 while the cache fills, again and again; after each kill every chunk the bitmap marks
/// present must hold the image's bytes, and the final cache must equal the image.
#[test]
fn kill_during_fill_never_leaves_wrong_bytes() {
    if !prerequisites_met() {
        return;
    }
    let env = Env::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut image = vec![0u8; 96 << 20];
    rng.fill_bytes(&mut image);
    std::fs::write(env.p("srv/crash.img"), &image).unwrap();
    // A slow origin (5 ms each way, 4 MiB/s per connection) so kills land mid-fill.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let upstream = env.base.trim_start_matches("http://").to_string();
    let proxy = Command::new(BIN)
        .args(["proxy", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &upstream, "--delay-ms", "5", "--rate", "4M"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _proxy = KillOnDrop(proxy);
    wait_for(|| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "proxy");
    let url = format!("http://127.0.0.1:{port}/crash.img");
    let warm = || {
        Command::new(BIN)
            .args(["warm", &url, "--parallel", "2", "--chunk-size", "64K", "--cache-dir"])
            .arg(env.p("cache"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut kills = 0;
    for _ in 0..8 {
        let mut child = warm();
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..2500)));
        if child.try_wait().unwrap().is_some() {
            break; // finished before we could kill it
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        verify_cache(&env.p("cache"), &image);
    }
    assert!(kills >= 3, "the fill finished too fast to test crashes ({kills} kills)");
    assert!(warm().wait().unwrap().success());
    let dir = cache_dir(&env.p("cache"));
    assert!(std::fs::read(dir.join("data")).unwrap() == image, "completed cache equals the image");
}

/// Kills a helper process (server, proxy) even when the test fails: a leaked child would hold the
/// test's output pipe open.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cache_dir(root: &Path) -> PathBuf {
    std::fs::read_dir(root).unwrap().flatten().map(|e| e.path()).find(|p| p.join("header.json").exists()).unwrap()
}

fn verify_cache(root: &Path, image: &[u8]) {
    let dir = cache_dir(root);
    let bitmap = std::fs::read(dir.join("bitmap")).unwrap();
    let data = std::fs::read(dir.join("data")).unwrap();
    let cs = 64 << 10;
    let mut present = 0;
    for c in 0..image.len().div_ceil(cs) {
        if bitmap.get(c / 8).is_some_and(|b| b & (1 << (c % 8)) != 0) {
            present += 1;
            let end = ((c + 1) * cs).min(image.len());
            assert!(data[c * cs..end] == image[c * cs..end], "chunk {c} is marked present but wrong");
        }
    }
    eprintln!("after kill: {present} chunks present, all correct");
}
