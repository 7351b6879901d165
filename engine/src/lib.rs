//! lazy-image engine: turns an image at a URL into lazily fetched, locally cached, verified
//! random access. Block-device front ends (FUSE+loop, ublk) and the CSI node plugin sit on top.

pub mod cache;
pub mod error;
mod filling;
mod image;
pub mod manifest;
pub mod source;
pub mod stats;

pub use error::{Error, ErrorKind, Result};
pub use image::{Condition, FillResume, ImageConfig, LazyImage, DEFAULT_CHUNK_SIZE};
pub use manifest::Manifest;
pub use source::{FakeSource, FileSource, HttpSource, ImageInfo, RangeSink, RangeSource};
pub use stats::StatsSnapshot;

/// Locks `m` even if a panic elsewhere poisoned it: that must not turn every later read into a
/// panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The manifest an image is verified with, if any: `manifest` (path or URL) when given, else
/// `image_url` + `.manifest` when a digest is pinned; with `pinned`, its digest must match.
pub async fn resolve_manifest(image_url: &str, manifest: Option<&str>, pinned: Option<&str>) -> Result<Option<Manifest>> {
    let loc = match (manifest, pinned) {
        (Some(m), _) => m.to_string(),
        (None, Some(_)) => format!("{image_url}.manifest"),
        (None, None) => return Ok(None),
    };
    load_manifest(&loc, pinned).await.map(Some)
}

/// Loads a manifest from a URL or a local path; with `pinned`, its digest must match.
pub async fn load_manifest(location: &str, pinned: Option<&str>) -> Result<Manifest> {
    let bytes = if location.starts_with("http://") || location.starts_with("https://") {
        let resp = reqwest::get(location)
            .await
            .map_err(|e| Error::with_source(ErrorKind::Transport, format!("manifest {location}"), e))?;
        if !resp.status().is_success() {
            return Err(Error::new(ErrorKind::OriginStatus(resp.status().as_u16()), format!("manifest {location}")));
        }
        resp.bytes()
            .await
            .map_err(|e| Error::with_source(ErrorKind::Transport, format!("manifest {location}"), e))?
            .to_vec()
    } else {
        std::fs::read(location).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::InvalidInput };
            Error::with_source(kind, format!("manifest {location}"), e)
        })?
    };
    Manifest::parse(&bytes, pinned)
}
