//! End-to-end with the ublk backend. Marked ignored, so a host without ublk reports them as such
//! rather than as passes: the test VM runs them (`bash tests/e2e/vm/run.sh`, with
//! `--include-ignored` and LAZY_IMAGE_REQUIRE_UBLK=1, so a missing /dev/ublk-control fails). On a
//! host with ublk: `cargo test -p lazy-image-cli --test e2e_ublk -- --include-ignored`.

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn ublk_ready() -> bool {
    let have = Path::new("/dev/ublk-control").exists();
    if !have {
        assert!(
            std::env::var_os("LAZY_IMAGE_REQUIRE_UBLK").is_none(),
            "LAZY_IMAGE_REQUIRE_UBLK is set but /dev/ublk-control is missing (modprobe ublk_drv)"
        );
        eprintln!("skipping: no /dev/ublk-control here; these tests run in the VM (bash tests/e2e/vm/run.sh)");
        return false;
    }
    prerequisites_met(&[])
}

/// ublk block and char devices present right now.
fn ublk_devices() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("ublkb") || n.starts_with("ublkc"))
        .collect();
    v.sort();
    v
}

fn assert_no_devices_left() {
    // Device nodes disappear asynchronously after DEL_DEV returns.
    let t = Instant::now();
    while !ublk_devices().is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ublk_devices(), Vec::<String>::new(), "ublk devices left behind");
}

#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_three_filesystems() {
    if !ublk_ready() {
        return;
    }
    let env = Env::new("ublk");
    three_filesystems(&env);
    assert_no_devices_left();
}

#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_partial_read_and_warm_reuse() {
    if !ublk_ready() {
        return;
    }
    partial_read_and_warm_reuse(&Env::new("ublk"));
    assert_no_devices_left();
}

#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_corrupt_chunk_is_eio() {
    if !ublk_ready() {
        return;
    }
    corrupt_chunk_is_eio(&Env::new("ublk"));
    assert_no_devices_left();
}

#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_full_cache_disk_keeps_serving() {
    if !ublk_ready() {
        return;
    }
    full_cache_disk_keeps_serving(&Env::new("ublk"));
    assert_no_devices_left();
}

/// The whole device, read with direct I/O in 1 MiB requests, is the image byte for byte: cold
/// (misses), warm (large cached reads go from mapped cache pages straight into the requests),
/// with the cache file out of the page cache (read through the queue's ring) and warm again.
#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_whole_device_reads_are_the_image() {
    if !ublk_ready() {
        return;
    }
    let env = Env::new("ublk");
    make_tree(&env.p("tree"), 11, &[9 << 20, 5 << 20, 300_001]);
    make_image("ext4", &env.p("tree"), &env.p("srv/whole.img"));
    let image = std::fs::read(env.p("srv/whole.img")).unwrap();
    let want = hex::encode(Sha256::digest(&image));
    let child = env.mount(&format!("{}/whole.img", env.base), "whole", &[]);
    let dev = lazy_image_attach::mount_source(&env.p("whole")).unwrap().expect("mounted from a device");
    let read_device = || {
        let out = Command::new("dd").arg(format!("if={}", dev.display())).args(["bs=1M", "iflag=direct", "status=none"]).output().unwrap();
        assert!(out.status.success(), "dd: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout.len() >= image.len(), "device shorter than the image");
        hex::encode(Sha256::digest(&out.stdout[..image.len()]))
    };
    assert_eq!(read_device(), want, "cold");
    assert_eq!(read_device(), want, "warm");
    sh(&mut Command::new("sync"));
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    assert_eq!(read_device(), want, "cache file evicted from the page cache");
    assert_eq!(read_device(), want, "warm again");
    env.umount("whole", child);
    assert_no_devices_left();
}

#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_local_sources_read_once_and_refuse_a_changed_source() {
    if !ublk_ready() {
        return;
    }
    local_sources_read_once_and_refuse_a_changed_source(&Env::new("ublk"));
    assert_no_devices_left();
}

#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_qcow2_images_mount() {
    if !ublk_ready() {
        return;
    }
    qcow2_images_mount(&Env::new("ublk"));
    assert_no_devices_left();
}

#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_overlaybd_layers_mount() {
    if !ublk_ready() {
        return;
    }
    overlaybd_layers_mount(&Env::new("ublk"));
    assert_no_devices_left();
}

#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_registry_images_mount() {
    if !ublk_ready() {
        return;
    }
    registry_images_mount(&Env::new("ublk"));
    assert_no_devices_left();
}

#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_writable_layer() {
    if !ublk_ready() {
        return;
    }
    writable_layer(&Env::new("ublk"));
    assert_no_devices_left();
}

/// kill -9 the daemon of a writable mount after its writes were acknowledged (synced): the
/// restarted daemon takes the device over with the same layer, every write is still there, and
/// writing goes on.
#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_writable_layer_survives_kill9() {
    if !ublk_ready() {
        return;
    }
    let env = Env::new("ublk");
    let sums = make_tree(&env.p("tree"), 23, &[2 << 20, 50_000]);
    make_image("ext4", &env.p("tree"), &env.p("srv/k.img"));
    let url = format!("{}/k.img", env.base);
    let mut daemon = KillOnDrop::new(env.mount(&url, "k", &["--writable"]));
    let dev = lazy_image_attach::mount_source(&env.p("k")).unwrap().expect("mounted from a device");
    assert_eq!(std::fs::read_to_string(format!("/sys/block/{}/ro", dev.file_name().unwrap().to_string_lossy())).unwrap().trim(), "0");
    let written = make_tree(&env.p("fresh"), 24, &[3 << 20]);
    std::fs::copy(env.p("fresh/file0.bin"), env.p("k/written-before.bin")).unwrap();
    syncfs(&env.p("k")).unwrap();
    daemon.child().kill().unwrap(); // SIGKILL
    daemon.child().wait().unwrap();
    assert!(lazy_mounted(&env.p("k")), "the mount survives its daemon");
    let new_daemon = KillOnDrop::new(env.mount(&url, "k", &["--writable"]));
    assert!(env.log("k").contains("took over /dev/ublkb"), "{}", env.log("k"));
    evict_tree(&env.p("k"));
    check_sums(&env.p("k"), &sums);
    assert_eq!(hex::encode(Sha256::digest(std::fs::read(env.p("k/written-before.bin")).unwrap())), written["file0.bin"]);
    std::fs::copy(env.p("fresh/file0.bin"), env.p("k/written-after.bin")).unwrap();
    syncfs(&env.p("k")).unwrap();
    evict_tree(&env.p("k"));
    assert_eq!(hex::encode(Sha256::digest(std::fs::read(env.p("k/written-after.bin")).unwrap())), written["file0.bin"]);
    env.umount("k", new_daemon.release());
    assert_no_devices_left();
}

/// The kernel sees a read-only disk: writes to the device itself fail.
#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_device_refuses_writes() {
    if !ublk_ready() {
        return;
    }
    let env = Env::new("ublk");
    let (child, dev) = mount_small_image(&env, "erofs", "ro");
    assert!(dev.to_string_lossy().starts_with("/dev/ublkb"), "{dev:?}");
    assert_eq!(std::fs::read_to_string(format!("/sys/block/{}/ro", dev.file_name().unwrap().to_string_lossy())).unwrap().trim(), "1");
    let res = std::fs::OpenOptions::new().write(true).open(&dev).and_then(|f| f.write_all_at(&[0u8; 4096], 0));
    assert!(res.is_err(), "writing to {dev:?} must fail");
    env.umount("ro", child);
    assert_no_devices_left();
}

/// kill -9 the daemon while readers are mid-file on a slow origin, start it again: the readers
/// (held by the kernel meanwhile) finish with no error and the right bytes, and the mount never
/// went away. Reports the time from restart to the first completed read.
#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_kill9_during_reads_then_restart() {
    if !ublk_ready() {
        return;
    }
    let env = Env::new("ublk");
    let sums = make_tree(&env.p("tree"), 6, &[6 << 20, 6 << 20, 6 << 20, 6 << 20]);
    make_image("ext4", &env.p("tree"), &env.p("srv/crash.img"));
    let (_proxy, base) = env.slow_proxy(5, "2M");
    let url = format!("{base}/crash.img");
    let mut daemon = KillOnDrop::new(env.mount(&url, "k", &[]));

    let start = Instant::now();
    let done_reads = Arc::new(AtomicU64::new(0));
    let last_read_ms = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = sums
        .iter()
        .map(|(name, want)| {
            let path = env.p(&format!("k/{name}"));
            let want = want.clone();
            let (done, last) = (done_reads.clone(), last_read_ms.clone());
            std::thread::spawn(move || -> Result<(), String> {
                let mut f = std::fs::File::open(&path).map_err(|e| format!("{path:?}: {e}"))?;
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 128 << 10];
                loop {
                    let n = f.read(&mut buf).map_err(|e| format!("{path:?}: read error {e}"))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    done.fetch_add(1, Ordering::SeqCst);
                    last.store(start.elapsed().as_millis() as u64, Ordering::SeqCst);
                }
                let got = hex::encode(h.finalize());
                if got == want {
                    Ok(())
                } else {
                    Err(format!("{path:?}: wrong bytes"))
                }
            })
        })
        .collect();

    // Readers well under way (1 MiB read), then the kill.
    wait_for(|| done_reads.load(Ordering::SeqCst) >= 8, "readers to get going");
    daemon.child().kill().unwrap(); // SIGKILL
    daemon.child().wait().unwrap();
    let at_kill = done_reads.load(Ordering::SeqCst);
    assert!(lazy_mounted(&env.p("k")), "the mount survives its daemon");
    let stalled = done_reads.load(Ordering::SeqCst);
    assert!(readers.iter().any(|r| !r.is_finished()), "the kill landed after the readers were done");

    let restart = Instant::now();
    let new_daemon = KillOnDrop::new(env.spawn_mount(&url, "k", &[]));
    wait_for(|| done_reads.load(Ordering::SeqCst) > stalled, "reads to resume");
    let resumed = restart.elapsed();
    report(&format!(
        "ublk recovery: reads resumed {:.0} ms after the daemon restarted ({at_kill} reads before the kill, {} while it was down)",
        resumed.as_secs_f64() * 1000.0,
        stalled - at_kill
    ));
    for r in readers {
        r.join().unwrap().expect("reader across the restart");
    }
    assert!(env.log("k").contains("took over /dev/ublkb"), "{}", env.log("k"));
    check_sums(&env.p("k"), &sums);
    env.umount("k", new_daemon.release());
    assert_no_devices_left();
}

/// A daemon that dies for good: `umount` cleans up its mount and device, and `cleanup` removes
/// a device nobody serves or mounts.
#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_stale_devices_are_cleaned_up() {
    if !ublk_ready() {
        return;
    }
    let env = Env::new("ublk");
    make_tree(&env.p("tree"), 8, &[1 << 20]);
    make_image("erofs", &env.p("tree"), &env.p("srv/stale.img"));
    let url = format!("{}/stale.img", env.base);

    let mut d = env.mount(&url, "s", &[]);
    d.kill().unwrap();
    d.wait().unwrap();
    assert_eq!(ublk_devices().len(), 2, "a dead daemon's device stays, waiting for recovery");
    let out = Command::new(BIN).arg("umount").arg(env.p("s")).arg("--run-dir").arg(env.p("run")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!lazy_mounted(&env.p("s")));
    assert_no_devices_left();

    // No record at all (say, the run directory was lost): unmount by hand, then `cleanup`.
    let mut d = env.mount(&url, "s", &[]);
    d.kill().unwrap();
    d.wait().unwrap();
    lazy_image_attach::unmount(&env.p("s")).unwrap();
    std::fs::remove_dir_all(env.p("run")).unwrap();
    let out = Command::new(BIN).arg("cleanup").arg("--run-dir").arg(env.p("run")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("deleted /dev/ublkb"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_no_devices_left();
}

/// `lazy-image mount` run under `chroot`: the paths it was given mean what they mean in the
/// caller's root, though the daemon lives in a mount namespace of its own and mounts from the
/// one it came from (whose root is not the caller's).
#[test]
#[ignore = "needs ublk: runs in the VM (tests/e2e/vm/run.sh)"]
fn ublk_mount_under_chroot_lands_in_the_callers_root() {
    if !ublk_ready() {
        return;
    }
    let env = Env::new("ublk");
    let sums = make_tree(&env.p("tree"), 3, &[1 << 20]);
    make_image("ext4", &env.p("tree"), &env.p("srv/c.img"));
    // A root of its own that shows the same files: / bound at `root`, recursively and private,
    // so a mount made on one side does not show on the other.
    let root = env.p("root");
    std::fs::create_dir_all(&root).unwrap();
    struct Unbind(std::path::PathBuf);
    impl Drop for Unbind {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-Rl").arg(&self.0).status();
        }
    }
    assert!(Command::new("mount").arg("--rbind").arg("/").arg(&root).status().unwrap().success());
    let _unbind = Unbind(root.clone());
    assert!(Command::new("mount").arg("--make-rprivate").arg(&root).status().unwrap().success());
    let mnt = env.p("cm");
    std::fs::create_dir_all(&mnt).unwrap();
    let inside = root.join(mnt.strip_prefix("/").unwrap());
    let log = std::fs::File::create(env.p("cm.log")).unwrap();
    // On a failure, the daemon is asked to stop (it unmounts, wherever it mounted) before it
    // is killed: a killed ublk daemon leaves its mount holding I/O for a successor, and the
    // clean-up of the test's directory would wait on it for good.
    struct Stop(KillOnDrop);
    impl Drop for Stop {
        fn drop(&mut self) {
            let pid = self.0.child().id() as i32;
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) && matches!(self.0.child().try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    let mut daemon = Stop(KillOnDrop::new(
        Command::new("chroot")
            .arg(&root)
            .arg(BIN)
            .args(["mount", &format!("{}/c.img", env.base)])
            .arg(&mnt)
            .args(["--backend", "ublk", "--cache-dir"])
            .arg(env.p("cache"))
            .arg("--run-dir")
            .arg(env.p("run"))
            .stderr(log)
            .spawn()
            .unwrap(),
    ));
    wait_for(
        || {
            if let Ok(Some(st)) = daemon.0.child().try_wait() {
                panic!("mount under chroot exited with {st}: {}", env.log("cm"));
            }
            lazy_mounted(&inside) && env.log("cm").contains("lazy-image: mounted ")
        },
        "the mount in the caller's root",
    );
    assert!(!lazy_mounted(&mnt), "mounted in the namespace's root, not the caller's");
    check_sums(&inside, &sums);
    let out = Command::new("chroot").arg(&root).arg(BIN).arg("umount").arg(&mnt).arg("--run-dir").arg(env.p("run")).output().unwrap();
    assert!(out.status.success(), "umount under chroot: {}\n{}", String::from_utf8_lossy(&out.stderr), env.log("cm"));
    assert!(daemon.0.child().wait().unwrap().success(), "{}", env.log("cm"));
    assert!(!lazy_mounted(&inside));
    assert_no_devices_left();
}
