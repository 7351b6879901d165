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
pub use image::{Condition, FillResume, ImageConfig, LazyImage, ReadPlan, DEFAULT_CHUNK_SIZE};
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
/// `headers` go with the request (the image's credentials: a private origin keeps its manifest
/// as private as its image).
pub async fn resolve_manifest(
    image_url: &str,
    manifest: Option<&str>,
    pinned: Option<&str>,
    headers: &http::HeaderMap,
) -> Result<Option<Manifest>> {
    let loc = match (manifest, pinned) {
        (Some(m), _) => m.to_string(),
        (None, Some(_)) => format!("{image_url}.manifest"),
        (None, None) => return Ok(None),
    };
    load_manifest(&loc, pinned, headers).await.map(Some)
}

/// Tries a manifest fetch gets: a dropped connection or an overloaded origin is tried again,
/// a refusal (4xx) is not.
const MANIFEST_TRIES: u32 = 4;

/// Loads a manifest from a URL (with `headers`, bounded in time, retried on transient failures)
/// or a local path; with `pinned`, its digest must match.
pub async fn load_manifest(location: &str, pinned: Option<&str>, headers: &http::HeaderMap) -> Result<Manifest> {
    let bytes = if location.starts_with("http://") || location.starts_with("https://") {
        fetch_manifest(location, headers).await?
    } else {
        std::fs::read(location).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound { ErrorKind::NotFound } else { ErrorKind::InvalidInput };
            Error::with_source(kind, format!("manifest {location}"), e)
        })?
    };
    Manifest::parse(&bytes, pinned)
}

async fn fetch_manifest(location: &str, headers: &http::HeaderMap) -> Result<Vec<u8>> {
    let what = || format!("manifest {location}");
    let client = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(60))
        .default_headers(headers.clone())
        .build()
        .map_err(|e| Error::with_source(ErrorKind::InvalidInput, what(), e))?;
    let mut backoff = std::time::Duration::from_millis(200);
    let mut tries = 0;
    loop {
        tries += 1;
        let attempt = async {
            let resp = client.get(location).send().await.map_err(|e| Error::with_source(ErrorKind::Transport, what(), e))?;
            if !resp.status().is_success() {
                return Err(Error::new(ErrorKind::OriginStatus(resp.status().as_u16()), what()));
            }
            resp.bytes().await.map(|b| b.to_vec()).map_err(|e| Error::with_source(ErrorKind::Transport, what(), e))
        };
        match attempt.await {
            Ok(b) => return Ok(b),
            Err(e) if tries < MANIFEST_TRIES && is_transient(&e) => {
                tracing::debug!(error = %e.report(), "manifest fetch failed; trying again");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_transient(e: &Error) -> bool {
    match e.kind() {
        ErrorKind::Transport | ErrorKind::DeadlineExceeded => true,
        ErrorKind::OriginStatus(s) => s >= 500 || s == 408 || s == 429,
        _ => false,
    }
}
