//! Probing an image's origin (size and validator) with the engine's own HTTP source, as the node
//! plugin does when it stages: one client, one notion of "the same image". A registry image is
//! resolved to its manifest the same way the node plugin resolves it.

use crate::error::{ControllerError, Kind, Result};
use lazy_image_csi_common::attributes::Credentials;
use lazy_image_engine::source::RangeSource;
use lazy_image_engine::{oci, HttpSource, ImageInfo};
use std::time::Duration;

#[async_trait::async_trait]
pub trait Origin: Send + Sync + 'static {
    async fn probe(&self, url: &str, credentials: Option<&Credentials>) -> Result<ImageInfo>;
}

/// The real origin, over HTTP(S).
pub struct HttpOrigin {
    pub timeout: Duration,
}

#[async_trait::async_trait]
impl Origin for HttpOrigin {
    async fn probe(&self, url: &str, credentials: Option<&Credentials>) -> Result<ImageInfo> {
        let what = format!("probing {url}");
        if url.starts_with("file://") || url.starts_with("device://") {
            return Err(ControllerError::invalid(format!(
                "{url} is node-local: only the nodes can read it, so it cannot be provisioned; use a static PersistentVolume or an inline volume"
            )));
        }
        if oci::is_reference(url) {
            return self.resolve_registry_image(url, credentials, &what).await;
        }
        let opts = Credentials::source_options(credentials)?;
        let source = HttpSource::new(url, opts).map_err(|e| ControllerError::engine(&what, &e))?;
        match tokio::time::timeout(self.timeout, source.probe()).await {
            Ok(r) => r.map_err(|e| ControllerError::engine(&what, &e)),
            Err(_) => Err(ControllerError::new(Kind::Unavailable, format!("{what}: no answer within {} s", self.timeout.as_secs()))),
        }
    }
}

impl HttpOrigin {
    /// A registry image as an origin: its manifest resolved (this platform's, from an index);
    /// the size is its layers' bytes and the validator the manifest's digest, which the volume
    /// is then pinned to (`pin`).
    async fn resolve_registry_image(&self, url: &str, credentials: Option<&Credentials>, what: &str) -> Result<ImageInfo> {
        let reference = oci::Reference::parse(url).map_err(|e| ControllerError::engine(what, &e))?;
        let creds = credentials.map(|c| c.to_registry()).transpose()?;
        let reg = oci::Registry::new(reference, creds).map_err(|e| ControllerError::engine(what, &e))?;
        match tokio::time::timeout(self.timeout, reg.resolve()).await {
            Ok(Ok(r)) => Ok(ImageInfo { size: r.layers.iter().map(|l| l.size).sum(), etag: Some(r.manifest_digest), last_modified: None }),
            Ok(Err(e)) => Err(ControllerError::engine(what, &e)),
            Err(_) => Err(ControllerError::new(Kind::Unavailable, format!("{what}: no answer within {} s", self.timeout.as_secs()))),
        }
    }
}

/// A registry image's reference pinned to the manifest digest it resolved to: every node serves
/// the image the volume was provisioned with, wherever its tag moves later.
pub fn pin(url: &str, info: &ImageInfo) -> Option<String> {
    let mut r = oci::Reference::parse(url).ok()?;
    r.digest = Some(info.etag.clone()?);
    Some(r.to_string())
}
