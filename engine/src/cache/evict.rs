//! Node-wide cache accounting and eviction of whole images that no process has open and no
//! one pinned (a warm order: the node was told to keep the image).

use super::store::{try_lock, CacheHeader};
use super::Bitmap;
use crate::error::{Error, Result};
use crate::stats::StatsSnapshot;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

#[derive(Debug, Clone)]
pub struct CachedImage {
    pub key: String,
    pub dir: PathBuf,
    pub header: CacheHeader,
    /// Bytes the cache occupies on disk.
    pub disk_bytes: u64,
    pub chunks_present: u64,
    pub last_used: SystemTime,
    /// Counters as last written by the process that had it open.
    pub stats: Option<StatsSnapshot>,
    /// Kept whatever the cache needs: eviction passes it by.
    pub pinned: bool,
}

/// The marker file of a pinned cache.
const PIN_FILE: &str = "pinned";

/// Pins the image cache in `dir`: eviction keeps it until `unpin`. Survives restarts.
pub fn pin(dir: &Path) -> Result<()> {
    std::fs::write(dir.join(PIN_FILE), b"").map_err(|e| Error::cache_io(format!("pinning {}", dir.display()), e))
}

/// Lets eviction drop the image cache in `dir` again (a cache never pinned is fine).
pub fn unpin(dir: &Path) -> Result<()> {
    match std::fs::remove_file(dir.join(PIN_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::cache_io(format!("unpinning {}", dir.display()), e)),
        _ => Ok(()),
    }
}

impl CachedImage {
    pub fn fill_ratio(&self) -> f64 {
        let total = self.header.chunks();
        if total == 0 {
            0.0
        } else {
            self.chunks_present as f64 / total as f64
        }
    }
}

fn disk_usage(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()).unwrap_or(0)
}

/// Lists the image caches under `root`, skipping directories that are not caches.
pub fn list_images(root: &Path) -> Result<Vec<CachedImage>> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::cache_io(format!("listing {}", root.display()), e)),
    };
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let dir = entry.path();
        let Some(header) = std::fs::read(dir.join("header.json")).ok().and_then(|b| serde_json::from_slice::<CacheHeader>(&b).ok()) else {
            continue;
        };
        let chunks_present =
            std::fs::read(dir.join("bitmap")).ok().and_then(|b| Bitmap::from_bytes(b, header.chunks())).map_or(0, |b| b.count_ones());
        let last_used = std::fs::metadata(dir.join("lock")).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
        let stats = std::fs::read(dir.join("stats.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let pinned = dir.join(PIN_FILE).exists();
        out.push(CachedImage {
            key: entry.file_name().to_string_lossy().into_owned(),
            disk_bytes: disk_usage(&dir),
            dir,
            header,
            chunks_present,
            last_used,
            stats,
            pinned,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Deletes least-recently-used caches that nobody has open until at most `target` bytes are used
/// under `root`, never touching `keep` or a pinned cache. Returns the bytes still used afterwards by images other
/// than `keep`.
pub fn evict_unused(root: &Path, target: u64, keep: &str) -> Result<u64> {
    let mut images = list_images(root)?;
    images.sort_by_key(|i| i.last_used);
    let mut total: u64 = images.iter().map(|i| i.disk_bytes).sum();
    let mut others: u64 = images.iter().filter(|i| i.key != keep).map(|i| i.disk_bytes).sum();
    for img in images.iter().filter(|i| i.key != keep && !i.pinned) {
        if total <= target {
            break;
        }
        let lock: Option<File> = OpenOptions::new().write(true).open(img.dir.join("lock")).ok();
        let Some(lock) = lock else { continue };
        if try_lock(&lock).is_err() {
            continue; // in use
        }
        tracing::info!(key = %img.key, bytes = img.disk_bytes, "evicting cached image");
        // Header first: a half-removed directory is then no longer a cache anyone would reuse.
        let _ = std::fs::remove_file(img.dir.join("header.json"));
        std::fs::remove_dir_all(&img.dir).map_err(|e| Error::cache_io(format!("evicting {}", img.dir.display()), e))?;
        total -= img.disk_bytes;
        others -= img.disk_bytes;
    }
    Ok(others)
}
