//! lazy-image engine: turns an image at a URL into lazily fetched, locally cached, verified
//! random access. Block-device front ends (FUSE+loop, ublk) and the CSI node plugin sit on top.

pub mod cache;
pub mod cow;
pub mod error;
mod filling;
mod image;
pub mod manifest;
pub mod oci;
pub mod source;
pub mod stats;
mod view;

pub use error::{Error, ErrorKind, Result};
pub use image::{Condition, FillResume, ImageConfig, LazyImage, ReadPlan, DEFAULT_CHUNK_SIZE};
pub use manifest::Manifest;
pub use source::{
    local_source, open_local, DeviceSource, FakeSource, FileSource, HttpSource, HttpSourceOptions, ImageInfo, RangeSink, RangeSource,
};

pub use cow::CowView;
use source::{RetryPolicy, Retrying};
pub use stats::StatsSnapshot;
use std::sync::Arc;
pub use view::{BlockView, View};

/// Locks `m` even if a panic elsewhere poisoned it: that must not turn every later read into a
/// panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The manifest an image is verified with, if any: `manifest` (path or URL) when given, else
/// `image_url` + `.manifest` when a digest is pinned; with `pinned`, its digest must match.
/// `opts` are the image's own HTTP options (a private origin keeps its manifest as private as
/// its image).
pub async fn resolve_manifest(
    image_url: &str,
    manifest: Option<&str>,
    pinned: Option<&str>,
    opts: &HttpSourceOptions,
) -> Result<Option<Manifest>> {
    let loc = match (manifest, pinned) {
        (Some(m), _) => m.to_string(),
        (None, Some(_)) => format!("{image_url}.manifest"),
        (None, None) => return Ok(None),
    };
    load_manifest(&loc, pinned, opts).await.map(Some)
}

/// Bounds the memory a manifest takes: about 8 million chunks.
pub const MAX_MANIFEST_BYTES: u64 = 512 << 20;

/// A manifest is read in pieces of this size, each retried on its own.
const MANIFEST_PIECE: u64 = 8 << 20;

/// Loads a manifest from a URL or a local path (`file://` or plain) through the same sources and
/// retry policy as image bytes (credentials and timeouts from `opts`); with `pinned`, its digest
/// must match. A manifest that changes while it is read is refused, as an image would be.
pub async fn load_manifest(location: &str, pinned: Option<&str>, opts: &HttpSourceOptions) -> Result<Manifest> {
    let what = format!("manifest {location}");
    let wrap = |e: Error| Error::with_source(e.kind(), what.clone(), e);
    let source: Arc<dyn RangeSource> = if location.starts_with("http://") || location.starts_with("https://") {
        Arc::new(HttpSource::new(location, opts.clone()).map_err(wrap)?)
    } else {
        Arc::new(FileSource::open(std::path::Path::new(location.strip_prefix("file://").unwrap_or(location))).map_err(wrap)?)
    };
    load_manifest_from(source, &what, pinned).await
}

/// Loads a manifest from `source` (already opened, e.g. through an allowlist), called `what`
/// in errors; as `load_manifest`.
pub async fn load_manifest_from(source: Arc<dyn RangeSource>, what: &str, pinned: Option<&str>) -> Result<Manifest> {
    let wrap = |e: Error| Error::with_source(e.kind(), what.to_string(), e);
    let source = Retrying::new(source, RetryPolicy::default(), Arc::new(stats::Stats::default()));
    let info = source.probe().await.map_err(wrap)?;
    if info.size > MAX_MANIFEST_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("{what}: {} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have", info.size),
        ));
    }
    let mut bytes = Vec::with_capacity(info.size as usize);
    while (bytes.len() as u64) < info.size {
        let at = bytes.len() as u64;
        let piece = source.fetch(at, MANIFEST_PIECE.min(info.size - at), &info).await.map_err(wrap)?;
        bytes.extend_from_slice(&piece);
    }
    Manifest::parse(&bytes, pinned)
}
