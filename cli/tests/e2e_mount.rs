//! End-to-end on the host: the real `lazy-image` binary serving, mounting with the FUSE + loop
//! backend, reading, unmounting; plus bad input and crash-consistency of the cache. Needs root,
//! /dev/fuse, losetup and the mkfs tools; when CI=true a missing one is a failure. The same
//! suite runs with ublk in the VM (`e2e_ublk.rs`).

mod common;

use common::*;
use rand::{Rng, RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn host_ready() -> bool {
    prerequisites_met(&[("/dev/fuse", Path::new("/dev/fuse").exists()), ("losetup", which("losetup"))])
}

fn loop_devices_on(cache: &Path) -> usize {
    let out = Command::new("losetup").arg("-a").output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(cache.to_str().unwrap())).count()
}

#[test]
fn fuse_three_filesystems() {
    if !host_ready() {
        return;
    }
    let env = Env::new("fuse");
    three_filesystems(&env);
    assert_eq!(loop_devices_on(&env.p("cache")), 0, "no loop device left behind");
}

/// The FUSE backend over /dev/fuse, where the kernel would offer io_uring (the default above).
#[test]
fn fuse_dev_three_filesystems() {
    if !host_ready() {
        return;
    }
    three_filesystems(&Env::new("fuse-dev"));
    partial_read_and_warm_reuse(&Env::new("fuse-dev"));
}

#[test]
fn fuse_partial_read_and_warm_reuse() {
    if !host_ready() {
        return;
    }
    partial_read_and_warm_reuse(&Env::new("fuse"));
}

#[test]
fn fuse_local_sources_read_once_and_refuse_a_changed_source() {
    if !host_ready() {
        return;
    }
    local_sources_read_once_and_refuse_a_changed_source(&Env::new("fuse"));
}

#[test]
fn fuse_writable_layer() {
    if !host_ready() {
        return;
    }
    let env = Env::new("fuse");
    writable_layer(&env);
    assert_eq!(loop_devices_on(&env.p("cache")), 0, "no loop device left behind");
}

#[test]
fn fuse_qcow2_images_mount() {
    if !host_ready() {
        return;
    }
    qcow2_images_mount(&Env::new("fuse"));
}

#[test]
fn fuse_overlaybd_layers_mount() {
    if !host_ready() {
        return;
    }
    overlaybd_layers_mount(&Env::new("fuse"));
}

#[test]
fn fuse_registry_images_mount() {
    if !host_ready() {
        return;
    }
    registry_images_mount(&Env::new("fuse"));
}

#[test]
fn fuse_full_cache_disk_keeps_serving() {
    if !host_ready() {
        return;
    }
    full_cache_disk_keeps_serving(&Env::new("fuse"));
}

/// The loop device over the FUSE file reads far ahead, in requests FUSE takes whole (1 MiB),
/// with direct I/O (blocks are cached once, above it); it is read-only and goes away by itself
/// once nothing holds it (autoclear).
#[test]
fn fuse_loop_queue_is_tuned() {
    if !host_ready() {
        return;
    }
    let env = Env::new("fuse");
    let (child, dev) = mount_small_image(&env, "ext4", "m");
    let sys = Path::new("/sys/block").join(dev.file_name().unwrap());
    let knob = |k: &str| std::fs::read_to_string(sys.join(k)).unwrap().trim().to_string();
    assert_eq!((knob("queue/read_ahead_kb").as_str(), knob("queue/max_sectors_kb").as_str()), ("4096", "1024"));
    assert_eq!((knob("ro").as_str(), knob("loop/dio").as_str(), knob("loop/autoclear").as_str()), ("1", "1", "1"));
    env.umount("m", child);
}

#[test]
fn fuse_corrupt_chunk_is_eio() {
    if !host_ready() {
        return;
    }
    corrupt_chunk_is_eio(&Env::new("fuse"));
}

/// Chunks the cache claims but whose bytes are gone from its file (cut short behind the
/// daemon's back) are an I/O error for their reader, never zeros; and the FUSE queues lose no
/// entry to those errors (each failed cache read cancels the answer linked behind it): once the
/// bytes are back, the file reads whole again.
#[test]
fn fuse_cache_file_cut_short_is_eio_and_reads_go_on() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    if !host_ready() {
        return;
    }
    let env = Env::new("fuse");
    let (child, dev) = mount_small_image(&env, "erofs", "m");
    let mut child = KillOnDrop::new(child);
    let pid = child.child().id();
    let queue_threads = || {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten();
        tasks.filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("lazy-image-fuse"))).count()
    };
    let queues = queue_threads();
    // The whole image cached, so nothing fetched later writes to the cut file (it would grow
    // it again, holes reading as zeros).
    assert_eq!(std::fs::read(dev).unwrap().len() as u64, std::fs::metadata(env.p("srv/m.img")).unwrap().len());
    let file = std::fs::File::open(env.p("m/file0.bin")).unwrap();
    let whole = |f: &std::fs::File| {
        // SAFETY: a valid open descriptor; advice only. Drops the file's pages above the device.
        assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        let mut all = vec![0u8; f.metadata()?.len() as usize];
        f.read_exact_at(&mut all, 0).map(|()| all)
    };
    let all = whole(&file).unwrap();
    assert!(all == std::fs::read(env.p("tree/file0.bin")).unwrap(), "first read of the image's file");

    // Read-ahead runs a reader has not copied whole stay in memory for a while and would answer
    // meanwhile: wait until the daemon's stats (written at each flush) say memory holds none,
    // in a snapshot taken after the whole image was read (no fetch, so no run, comes after).
    let stats_path = cache_dir(&env.p("cache")).join("stats.json");
    let read_before = std::fs::metadata(env.p("srv/m.img")).unwrap().len();
    wait_for(
        || {
            let s: serde_json::Value = std::fs::read(&stats_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            s["bytes_read"].as_u64().is_some_and(|n| n >= read_before) && s["recent_bytes"] == 0
        },
        "read-ahead runs to leave memory",
    );
    let data_path = cache_dir(&env.p("cache")).join("data");
    let saved = std::fs::read(&data_path).unwrap();
    let data = std::fs::OpenOptions::new().write(true).open(&data_path).unwrap();
    data.set_len(0).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut page = [0u8; 4096];
        // SAFETY: as above.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let reads: Vec<_> = (0..40usize)
            .map(|k| {
                let at = k * 24 * 1024;
                file.read_at(&mut page, at as u64).map(|n| page[..n] == all[at..at + n]).map_err(|e| e.raw_os_error())
            })
            .collect();
        let _ = done_tx.send(reads);
        // Put back every block that held bytes (a block of zeros reads the same from a hole).
        for (i, block) in saved.chunks(4096).enumerate() {
            if block.iter().any(|&b| b != 0) {
                data.write_all_at(block, (i * 4096) as u64).unwrap();
            }
        }
        let _ = done_tx.send(vec![whole(&file).map(|again| again == all).map_err(|e| e.raw_os_error())]);
    });
    let reads = done_rx.recv_timeout(Duration::from_secs(60)).expect("reads of a cut cache file hung");
    // More failures than the queues have entries.
    assert!(reads.iter().all(|r| *r == Err(Some(libc::EIO))), "{reads:?}");
    let again = done_rx.recv_timeout(Duration::from_secs(60)).expect("reads after cache errors hung");
    assert_eq!(again, [Ok(true)], "the file reads whole once the cache file has its bytes back");
    if env.fuse_transport() == Some("(FUSE over io_uring)") {
        assert!(queues > 0);
        assert_eq!(queue_threads(), queues, "every FUSE queue still serves");
    }
    env.umount("m", child.release());
}

#[test]
fn complete_image_mounts_on_its_cache_file_and_outlives_its_daemon() {
    if !host_ready() {
        return;
    }
    let env = Env::new("fuse");
    let sums = make_tree(&env.p("tree"), 4, &[3 << 20, 50_000, 9 << 20]);
    make_image("ext4", &env.p("tree"), &env.p("srv/full.img"));
    let url = format!("{}/full.img", env.base);
    // A first mount fetches the rest of the image in the background while it is read.
    let child = env.mount(&url, "m", &["--prefetch"]);
    check_sums(&env.p("m"), &sums);
    wait_for(|| env.log("m").contains("the whole image is cached now"), "background prefetch");
    env.umount("m", child);
    let size = std::fs::metadata(env.p("srv/full.img")).unwrap().len();
    assert_eq!(env.stat()[0]["stats"]["origin_bytes"].as_u64().unwrap(), size, "each byte fetched once");
    let data_file = cache_dir(&env.p("cache")).join("data");

    let child = env.mount(&url, "m", &[]);
    assert!(env.log("m").contains("reads the cache file directly"), "{}", env.log("m"));
    let backing = |dev: &str| std::fs::read_to_string(format!("/sys/block/{dev}/loop/backing_file")).unwrap();
    let dev = lazy_image_attach::mount_source(&env.p("m")).unwrap().expect("mounted from a device");
    let dev_name = dev.file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(backing(&dev_name).trim(), data_file.to_str().unwrap(), "the loop device reads the cache file");
    assert!(!std::fs::read_to_string("/proc/self/mounts").unwrap().contains(env.p("cache").to_str().unwrap()), "no FUSE mount");
    check_sums(&env.p("m"), &sums);

    // The daemon dies: nothing sits between the loop device and the file, so reads go on.
    let mut killed = KillOnDrop::new(child);
    killed.child().kill().unwrap();
    killed.child().wait().unwrap();
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    check_sums(&env.p("m"), &sums);

    // A new daemon adopts the mount as it is; then it unmounts cleanly.
    let child = env.mount(&url, "m", &[]);
    assert!(env.log("m").contains("adopted"), "{}", env.log("m"));
    assert_eq!(lazy_image_attach::mount_source(&env.p("m")).unwrap(), Some(dev));
    check_sums(&env.p("m"), &sums);
    env.umount("m", child);
    assert_eq!(loop_devices_on(&env.p("cache")), 0, "no loop device left behind");
    assert_eq!(env.stat()[0]["stats"]["origin_bytes"].as_u64().unwrap(), 0, "nothing fetched once complete");
}

#[test]
fn digest_pinned_mount_and_bad_inputs() {
    if !host_ready() {
        return;
    }
    let env = Env::new("fuse");
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
    if !host_ready() {
        return;
    }
    let env = Env::new("fuse");
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
    let _proxy = KillOnDrop::new(proxy);
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
