//! Local sources: a file changed under the source, and a block device (a loop device over a
//! file) as ULOOP's `ulobdev` served one. Needs root and loop devices, as CI has; elsewhere the
//! device tests say so and skip.

mod common;

use lazy_image_engine::source::RangeSource;
use lazy_image_engine::{open_local, ErrorKind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// A read-only loop device over `file`, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn over(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(file).output().ok()?;
        if !out.status.success() {
            assert!(std::env::var_os("CI").is_none(), "CI must be able to make loop devices: {}", String::from_utf8_lossy(&out.stderr));
            eprintln!("skipping: no loop device here ({})", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        Some(Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Every byte of the device through the engine, a second pass from the cache; the device's end
/// falls inside a 4 KiB block, which direct reads must still serve.
#[tokio::test]
async fn block_device_source_serves_its_bytes() {
    let data = common::pattern((3 << 20) + 3 * 4096 + 512, 5);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &data).unwrap();
    let Some(dev) = Loop::over(f.path()) else { return };
    let src = open_local(&dev.0).unwrap();
    assert_eq!(src.probe().await.unwrap().size, data.len() as u64);
    common::source_suite(src, &data).await;
}

/// A device that grows under its source (a resized LUN) is another image: fetches fail, they
/// never mix.
#[tokio::test]
async fn resized_device_is_a_changed_origin() {
    let data = common::pattern(1 << 20, 6);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &data).unwrap();
    let Some(dev) = Loop::over(f.path()) else { return };
    let src: Arc<dyn RangeSource> = open_local(&dev.0).unwrap();
    let info = src.probe().await.unwrap();
    assert_eq!(&src.fetch(4096, 4096, &info).await.unwrap()[..], &data[4096..8192]);
    f.as_file().set_len(2 << 20).unwrap();
    assert!(Command::new("losetup").arg("-c").arg(&dev.0).status().unwrap().success());
    let e = src.fetch(4096, 4096, &info).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OriginChanged, "{}", e.report());
}

/// A file rewritten in place after the probe: fetches fail with OriginChanged.
#[tokio::test]
async fn rewritten_file_is_a_changed_origin() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), common::pattern(64 << 10, 7)).unwrap();
    let src = open_local(f.path()).unwrap();
    let info = src.probe().await.unwrap();
    src.fetch(0, 4096, &info).await.unwrap();
    // A different mtime even on a coarse clock.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    std::fs::write(f.path(), common::pattern(64 << 10, 8)).unwrap();
    f.as_file().set_modified(later).unwrap();
    let e = src.fetch(0, 4096, &info).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OriginChanged, "{}", e.report());
}
