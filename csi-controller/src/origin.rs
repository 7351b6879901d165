//! Probing an image's origin (size and validator) with the engine's own HTTP source, as the node
//! plugin does when it stages: one client, one notion of "the same image".

use crate::error::{ControllerError, Kind, Result};
use lazy_image_csi_common::attributes::Credentials;
use lazy_image_engine::source::{HttpSourceOptions, RangeSource};
use lazy_image_engine::{HttpSource, ImageInfo};
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
        if lazy_image_engine::oci::is_reference(url) {
            return Err(ControllerError::invalid(format!(
                "{url} is a registry image: provisioning those is not supported yet; use a static PersistentVolume or an inline volume"
            )));
        }
        let mut opts = HttpSourceOptions::default();
        if let Some(c) = credentials {
            let mut v =
                http::HeaderValue::from_str(&c.0).map_err(|_| ControllerError::invalid("credentials are not a valid header value"))?;
            v.set_sensitive(true);
            opts.headers.insert(http::header::AUTHORIZATION, v);
        }
        let source = HttpSource::new(url, opts).map_err(|e| ControllerError::engine(&what, &e))?;
        match tokio::time::timeout(self.timeout, source.probe()).await {
            Ok(r) => r.map_err(|e| ControllerError::engine(&what, &e)),
            Err(_) => Err(ControllerError::new(Kind::Unavailable, format!("{what}: no answer within {} s", self.timeout.as_secs()))),
        }
    }
}
