//! Image formats served as block device views (`lazy_image_engine::BlockView`) over lazily
//! fetched blobs. The engine stays the lazy cache of one blob; a format decides where each
//! block of the device comes from (this blob, zeros, or the image beneath it), the dm-userspace
//! idea. Today, read-only: qcow2 images and their backing chains, and OverlayBD layer stacks.

pub mod overlaybd;
pub mod qcow2;

use async_trait::async_trait;
use lazy_image_engine::{Error, ErrorKind, LazyImage, Result, View};

/// Opens the blob at a URL (or local path) as a lazily fetched image, with the caller's
/// sources, credentials, cache and allowlist: a backing file is opened the way its child was.
#[async_trait]
pub trait BlobOpener: Send + Sync {
    async fn open(&self, url: &str) -> Result<LazyImage>;
}

/// The image at `url` as a device, by its first bytes: a qcow2 image with its backing chain,
/// an OverlayBD layer on the layers `lowers` (bottom first), or else the blob itself. Returns
/// the top blob (for fills and closing) and the view a backend serves.
pub async fn open_view(url: &str, lowers: &[String], opener: &dyn BlobOpener) -> Result<(LazyImage, View)> {
    let blob = opener.open(url).await?;
    if lowers.is_empty() {
        return Ok((blob.clone(), view_of(url, blob, opener).await?));
    }
    if layered_format(&blob).await? != Some(Layered::OverlayBd) {
        return Err(refuse(url, "only an OverlayBD layer stacks on lower layers"));
    }
    let mut blobs = Vec::with_capacity(lowers.len() + 1);
    for l in lowers {
        blobs.push((l.clone(), opener.open(l).await?));
    }
    blobs.push((url.to_string(), blob.clone()));
    Ok((blob, overlaybd::open_stack(blobs).await?))
}

/// The device a blob found at `url` holds, by its first bytes: a qcow2 image with its backing
/// chain (opened through `opener`), a lone OverlayBD layer, or the blob itself.
pub async fn view_of(url: &str, blob: LazyImage, opener: &dyn BlobOpener) -> Result<View> {
    match layered_format(&blob).await? {
        Some(Layered::Qcow2) => qcow2::Qcow2::open(blob, url, opener, Vec::new()).await,
        Some(Layered::OverlayBd) => overlaybd::open_stack(vec![(url.to_string(), blob)]).await,
        None => Ok(blob.view()),
    }
}

/// The image a resolved OCI reference names, as a device: OverlayBD layers (each with
/// OverlayBD's annotation) as a stack, bottom first; or a single-blob artifact (a filesystem
/// image pushed with `oras push`, say) as the image it holds. `opener` opens a layer's blob by
/// its digest. Returns the top blob and the view.
pub async fn open_oci(resolved: &lazy_image_engine::oci::Resolved, opener: &dyn BlobOpener) -> Result<(LazyImage, View)> {
    let what = resolved.reference.to_string();
    let layers = &resolved.layers;
    let marked = layers.iter().filter(|l| l.overlaybd).count();
    if marked > 0 && marked < layers.len() {
        return Err(refuse(&what, format!("{marked} of its {} layers are OverlayBD layers and the rest are not", layers.len())));
    }
    if marked == 0 && layers.len() > 1 {
        return Err(refuse(
            &what,
            format!(
                "an image of {} layers without OverlayBD's annotation (a container image of tar layers?) is not a block image: push the filesystem image as a single-blob artifact, or convert it to OverlayBD",
                layers.len()
            ),
        ));
    }
    let mut blobs = Vec::with_capacity(layers.len());
    for l in layers {
        blobs.push((format!("{what} layer {}", l.digest), opener.open(&l.digest).await?));
    }
    let Some((_, top)) = blobs.last().cloned() else { return Err(refuse(&what, "an image with no layers")) };
    if marked > 0 {
        return Ok((top, overlaybd::open_stack(blobs).await?));
    }
    match layered_format(&top).await? {
        Some(Layered::OverlayBd) => Ok((top, overlaybd::open_stack(blobs).await?)),
        Some(Layered::Qcow2) => Err(refuse(&what, "a qcow2 image in a registry is not supported (its backing files have no place there)")),
        None => Ok((top.clone(), top.view())),
    }
}

/// A format whose blob is not the device itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layered {
    Qcow2,
    OverlayBd,
}

/// The layered format a blob holds, by its first bytes, if any.
async fn layered_format(blob: &LazyImage) -> Result<Option<Layered>> {
    let head = blob.read(0, blob.size().min(72)).await?;
    Ok(if overlaybd::has_magic(&head) {
        Some(Layered::OverlayBd)
    } else if qcow2::has_magic(&head) {
        Some(Layered::Qcow2)
    } else {
        None
    })
}

pub(crate) fn refuse(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidInput, format!("{what}: {why}"))
}

pub(crate) fn corrupt(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Integrity, format!("{what} is corrupt: {why}"))
}
