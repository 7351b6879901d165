//! Image formats served as block device views (`lazy_image_engine::BlockView`) over lazily
//! fetched blobs. The engine stays the lazy cache of one blob; a format decides where each
//! block of the device comes from (this blob, zeros, or the image beneath it), the dm-userspace
//! idea. Today: qcow2 images and their backing chains, read-only.

pub mod qcow2;

use async_trait::async_trait;
use lazy_image_engine::{Error, ErrorKind, LazyImage, Result, View};

/// Opens the blob at a URL (or local path) as a lazily fetched image, with the caller's
/// sources, credentials, cache and allowlist: a backing file is opened the way its child was.
#[async_trait]
pub trait BlobOpener: Send + Sync {
    async fn open(&self, url: &str) -> Result<LazyImage>;
}

/// The image at `url` as a device: a qcow2 image (detected by its magic) with its backing
/// chain, or else the blob itself. Returns the top blob (for stats, fills and closing) and the
/// view a backend serves.
pub async fn open_view(url: &str, opener: &dyn BlobOpener) -> Result<(LazyImage, View)> {
    let blob = opener.open(url).await?;
    let view = match qcow2::is_qcow2(&blob).await? {
        true => qcow2::Qcow2::open(blob.clone(), url, opener, Vec::new()).await?,
        false => blob.view(),
    };
    Ok((blob, view))
}

pub(crate) fn refuse(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidInput, format!("{what}: {why}"))
}

pub(crate) fn corrupt(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Integrity, format!("{what} is corrupt: {why}"))
}
