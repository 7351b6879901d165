//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use lazy_image_engine::{ImageConfig, LazyImage, RangeSource};
use std::sync::Arc;
use std::time::Duration;

/// Deterministic, non-repeating test content: every 8-byte word encodes its own offset.
pub fn pattern(size: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(size + 8);
    let mut i = 0u64;
    while v.len() < size {
        v.extend_from_slice(&(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed).to_le_bytes());
        i += 1;
    }
    v.truncate(size);
    v
}

pub fn config(dir: &std::path::Path) -> ImageConfig {
    let mut cfg = ImageConfig::new(dir);
    cfg.chunk_size = 4096;
    cfg.max_request = 64 << 10;
    cfg.readahead_initial = 16 << 10;
    cfg.readahead_max = 256 << 10;
    cfg.flush_interval = Duration::from_millis(50);
    cfg.retry.first_backoff = Duration::from_millis(5);
    cfg.retry.deadline = Duration::from_secs(5);
    // Tests count origin bytes exactly; the widened first misses have a test of their own.
    cfg.startup_misses = 0;
    cfg
}

pub async fn open(src: Arc<dyn RangeSource>, dir: &std::path::Path) -> LazyImage {
    LazyImage::open(src, config(dir)).await.expect("open image")
}

/// The suite every source must pass: whole-image, unaligned, tail and past-the-end reads equal
/// the reference bytes, both cold and warm.
pub async fn source_suite(src: Arc<dyn RangeSource>, reference: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let img = open(src, dir.path()).await;
    assert_eq!(img.size(), reference.len() as u64);
    let n = reference.len() as u64;
    for pass in 0..2 {
        for &(off, len) in &[(0u64, 1u64), (4095, 2), (1000, 20_000), (n - 10, 10), (n - 10, 100), (0, n)] {
            let got = img.read(off, len).await.expect("read");
            let end = (off + len).min(n);
            assert_eq!(&got[..], &reference[off as usize..end as usize], "pass {pass} read {off}+{len}");
        }
        assert!(img.read(n, 10).await.unwrap().is_empty());
    }
    let s = img.stats();
    assert!(s.origin_bytes <= n, "never fetched a byte twice: {} > {n}", s.origin_bytes);
    assert!(s.chunk_hits > 0);
}

/// A small tmpfs to fill up, unmounted on drop. `None` (the test skips) where mounting is not
/// allowed, except in CI, which runs as root and must run it.
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(bytes: u64) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "lazy-image-test"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(std::env::var_os("CI").is_none(), "CI must be able to mount a tmpfs (run as root)");
            eprintln!("skipping: cannot mount a tmpfs here (not root?)");
            return None;
        }
        Some(SmallDisk { dir })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Gives the filesystem `bytes` in all.
    pub fn resize(&self, bytes: u64) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={bytes}")])
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "resizing the tmpfs at {}", self.dir.path().display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
