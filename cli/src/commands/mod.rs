//! One module per command; `run` builds the runtime and dispatches.

mod convert;
mod manifest;
mod mount;
mod serve;
mod stat;
mod warm;

use crate::args::{Cli, Command, ImageArgs};
use anyhow::{Context, Result};
use lazy_image_attach::Backend;
use lazy_image_engine::oci;
use lazy_image_engine::{manifest::parse_digest, open_local, resolve_manifest, HttpSource, ImageConfig, LazyImage, RangeSource, View};
use lazy_image_formats::{open_oci, open_view, BlobOpener};
use std::sync::Arc;

pub fn run(cli: Cli) -> Result<()> {
    // A ublk server must live in a mount namespace of its own, entered before any thread starts.
    let backend = match &cli.command {
        Command::Mount(a) => {
            let b = Backend::resolve(a.backend.parse()?)?;
            if b == Backend::Ublk {
                lazy_image_attach::namespace::enter_private_mount_namespace(&[])?;
            }
            Some(b)
        }
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("lazy-image")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Command::Serve(a) => serve::run(a).await,
            Command::Mount(a) => mount::mount(a, backend.unwrap_or(Backend::Fuse)).await,
            Command::Cleanup(a) => mount::cleanup(a).await,
            Command::Umount(a) => mount::umount(a).await,
            Command::Manifest(m) => manifest::run(m),
            Command::Stat(a) => stat::run(a),
            Command::Warm(a) => warm::run(a).await,
            Command::Convert(a) => convert::run(a),
            Command::Proxy(a) => {
                eprintln!("lazy-image: proxying {} -> {} with {} ms each way", a.listen, a.upstream, a.delay_ms);
                lazy_image_serve::proxy::run(a.listen, a.upstream, std::time::Duration::from_millis(a.delay_ms), a.rate)
                    .await
                    .context("proxy")
            }
        }
    })
}

/// Turns the image arguments into an open `LazyImage`: source, manifest/digest, cache settings.
pub(crate) async fn open_image(a: &ImageArgs) -> Result<LazyImage> {
    open_blob(a).await.map_err(|e| anyhow::anyhow!(e.report()))
}

/// The device the image arguments name: a qcow2 image with its backing chain, an OverlayBD
/// layer on `lowers`, or the image itself; with the top blob (stats, cache) beside it.
pub(crate) async fn open_device(a: &ImageArgs, lowers: &[String]) -> Result<(LazyImage, View)> {
    if oci::is_reference(&a.url) {
        return open_registry_image(a, lowers).await;
    }
    open_view(&a.url, lowers, &Blobs(a)).await.map_err(|e| anyhow::anyhow!(e.report()))
}

/// A registry image: its manifest resolved, its layers opened as blobs cached by digest.
async fn open_registry_image(a: &ImageArgs, lowers: &[String]) -> Result<(LazyImage, View)> {
    if a.manifest.is_some() || a.digest.is_some() || !lowers.is_empty() {
        anyhow::bail!("--manifest, --digest and --lower are for URLs: a registry image is pinned with @sha256:... in its reference and names its own layers");
    }
    let report = |e: lazy_image_engine::Error| anyhow::anyhow!(e.report());
    let reference = oci::Reference::parse(&a.url).map_err(report)?;
    let reg = Arc::new(oci::Registry::new(reference, a.registry.credentials()?).map_err(report)?);
    let resolved = reg.resolve().await.map_err(report)?;
    let kind = if resolved.layers.iter().any(|l| l.overlaybd) { "OverlayBD layers" } else { "blobs" };
    eprintln!("lazy-image: {} is manifest {} ({} {kind})", resolved.reference, resolved.manifest_digest, resolved.layers.len());
    open_oci(&resolved, &RegistryBlobs { a, reg: reg.clone(), resolved: resolved.clone() }).await.map_err(report)
}

/// Opens a registry image's layers by digest, each cached under its digest.
struct RegistryBlobs<'a> {
    a: &'a ImageArgs,
    reg: Arc<oci::Registry>,
    resolved: oci::Resolved,
}

#[async_trait::async_trait]
impl BlobOpener for RegistryBlobs<'_> {
    async fn open(&self, digest: &str) -> lazy_image_engine::Result<LazyImage> {
        self.reg.open_layer(self.resolved.layer(digest)?, cache_config(self.a)).await
    }
}

fn cache_config(a: &ImageArgs) -> ImageConfig {
    let mut cfg = ImageConfig::new(&a.cache.cache_dir);
    cfg.cache_limit = a.cache.cache_limit;
    if let Some(cs) = a.chunk_size {
        cfg.chunk_size = cs;
    }
    cfg
}

/// Opens the blobs of a chain: the top one with the arguments' digest or manifest, backing
/// files without (qcow2 pins nothing of them), all with the same cache settings.
struct Blobs<'a>(&'a ImageArgs);

#[async_trait::async_trait]
impl BlobOpener for Blobs<'_> {
    async fn open(&self, url: &str) -> lazy_image_engine::Result<LazyImage> {
        if url == self.0.url {
            return open_blob(self.0).await;
        }
        open_blob(&ImageArgs { url: url.to_string(), manifest: None, digest: None, ..self.0.clone() }).await
    }
}

async fn open_blob(a: &ImageArgs) -> lazy_image_engine::Result<LazyImage> {
    let source: Arc<dyn RangeSource> = if a.url.starts_with("http://") || a.url.starts_with("https://") {
        Arc::new(HttpSource::new(&a.url, Default::default())?)
    } else {
        if a.url.contains("://") && !a.url.starts_with("file://") {
            return Err(lazy_image_engine::Error::new(
                lazy_image_engine::ErrorKind::InvalidInput,
                format!(
                    "image URL {:?} must be http://, https://, file:// or a local path (mount also takes oci:// registry images)",
                    a.url
                ),
            ));
        }
        open_local(std::path::Path::new(a.url.strip_prefix("file://").unwrap_or(&a.url)))?
    };
    let digest = a.digest.as_deref().map(parse_digest).transpose()?;
    let manifest = resolve_manifest(&a.url, a.manifest.as_deref(), digest.as_deref(), &Default::default()).await?;
    let mut cfg = cache_config(a);
    cfg.manifest = manifest;
    LazyImage::open(source, cfg).await
}
