//! Command-line arguments, one clap-derive struct per command.

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "lazy-image", version, about = "Mount filesystem images from a URL, fetched lazily block by block")]
pub struct Cli {
    /// Log debug details to stderr (or set LAZY_IMAGE_LOG=...).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the files of DIR over HTTP with Range, ETag and HEAD support.
    Serve(ServeArgs),
    /// Attach an image lazily and mount it read-only; runs in the foreground until Ctrl-C.
    Mount(MountArgs),
    /// Unmount a filesystem mounted by `lazy-image mount` and detach its device.
    Umount(UmountArgs),
    /// Integrity manifests.
    #[command(subcommand)]
    Manifest(ManifestCommand),
    /// Show cached images: fill, hits, bytes fetched from the origin.
    Stat(StatArgs),
    /// Fetch a whole image into the local cache ahead of use.
    Warm(WarmArgs),
    /// Turn a flat filesystem image into an OverlayBD layer (optionally ZFile-compressed), or
    /// with --base into the layer of what differs from another image.
    Convert(ConvertArgs),
    /// Remove what lazy-image daemons that died left behind: mounts, loop and ublk devices.
    Cleanup(CleanupArgs),
    /// A TCP proxy that adds latency each way (for benchmarks on loopback).
    #[command(hide = true)]
    Proxy(ProxyArgs),
}

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Where image caches live.
    #[arg(long, default_value = "/var/cache/lazy-image")]
    pub cache_dir: PathBuf,
    /// Node-wide cache limit (e.g. 20G); images not in use are evicted to stay under it.
    #[arg(long, value_parser = crate::units::parse_size)]
    pub cache_limit: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct ImageArgs {
    /// Image URL (http://, https://), a local file path, or a registry image
    /// (oci://REGISTRY/REPOSITORY[:TAG][@sha256:...], oci+http:// for a plain-http registry).
    pub url: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// Integrity manifest (path or URL) from `lazy-image manifest build`.
    #[arg(long)]
    pub manifest: Option<String>,
    /// Pinned image digest (sha256:...): the manifest's own digest. Without --manifest the
    /// manifest is fetched from URL.manifest.
    #[arg(long)]
    pub digest: Option<String>,
    /// Cache and fetch unit (power of two, 4K..16M). Ignored with a manifest, which sets it.
    #[arg(long, value_parser = crate::units::parse_size)]
    pub chunk_size: Option<u64>,
}

/// Registry credentials, from the environment only (never on a command line others can read).
#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    #[arg(skip = std::env::var("LAZY_IMAGE_REGISTRY_USER").ok())]
    pub user: Option<String>,
    #[arg(skip = std::env::var("LAZY_IMAGE_REGISTRY_PASSWORD").ok())]
    pub password: Option<String>,
    #[arg(skip = std::env::var("LAZY_IMAGE_REGISTRY_TOKEN").ok())]
    pub token: Option<String>,
}

impl RegistryArgs {
    pub fn credentials(&self) -> anyhow::Result<Option<lazy_image_engine::oci::Credentials>> {
        use lazy_image_engine::oci::Credentials;
        Ok(match (&self.user, &self.password, &self.token) {
            (_, _, Some(t)) => Some(Credentials::Bearer(t.clone())),
            (Some(u), Some(p), None) => Some(Credentials::Basic { user: u.clone(), password: p.clone() }),
            (Some(_), None, None) => anyhow::bail!("LAZY_IMAGE_REGISTRY_USER is set but LAZY_IMAGE_REGISTRY_PASSWORD is not"),
            (None, _, None) => None,
        })
    }
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The flat image (ext4, erofs, squashfs or any disk image).
    pub image: PathBuf,
    /// The layer file to write.
    pub output: PathBuf,
    /// Write only the blocks that differ from this flat image: the layer to stack on the one
    /// converted from BASE.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Compress the layer as a ZFile: lz4 or zstd.
    #[arg(long)]
    pub compress: Option<lazy_image_formats::overlaybd::zfile::Algo>,
    /// ZFile block size, 4K to 32K.
    #[arg(long, default_value = "4K", value_parser = crate::units::parse_size)]
    pub block_size: u64,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    pub dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    pub mountpoint: PathBuf,
    /// An OverlayBD layer beneath the image's (repeat, bottom first): URL is the top layer.
    #[arg(long = "lower", value_name = "URL")]
    pub lowers: Vec<String>,
    /// Filesystem type: auto, ext4, erofs or squashfs.
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Where running mounts are recorded.
    #[arg(long, default_value = "/run/lazy-image")]
    pub run_dir: PathBuf,
    /// Block backend: auto (ublk when /dev/ublk-control exists, else FUSE+loop), ublk or fuse.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Fetch the rest of the image in the background while mounted (two 1 MiB requests at a
    /// time, beside readers' own misses).
    /// Once complete, the next FUSE+loop mount reads the cache file directly.
    #[arg(long)]
    pub prefetch: bool,
    /// Mount read-write: writes land in a local copy-on-write layer under the run directory,
    /// thrown away at unmount; the image and its cache are never written (ext4 only).
    #[arg(long)]
    pub writable: bool,
    /// Most bytes of changed blocks the writable layer may hold (default: the image's size);
    /// writes needing more fail with ENOSPC.
    #[arg(long, value_parser = crate::units::parse_size, requires = "writable")]
    pub writable_size: Option<u64>,
    #[command(flatten)]
    pub ublk: UblkArgs,
}

#[derive(Args, Debug, Clone)]
pub struct UblkArgs {
    /// ublk hardware queues (each served by one thread).
    #[arg(long, default_value_t = 1)]
    pub ublk_queues: u16,
    /// ublk requests in flight per queue.
    #[arg(long, default_value_t = 128)]
    pub ublk_depth: u16,
}

#[derive(Args, Debug)]
pub struct CleanupArgs {
    #[arg(long, default_value = "/run/lazy-image")]
    pub run_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
    #[arg(long, default_value = "/run/lazy-image")]
    pub run_dir: PathBuf,
    /// How long to wait for the mount's daemon to finish.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

#[derive(Subcommand, Debug)]
pub enum ManifestCommand {
    /// Write a manifest of per-chunk SHA-256 digests for IMAGE and print its digest.
    Build {
        image: PathBuf,
        /// Output file (default: IMAGE.manifest).
        #[arg(long, short)]
        output: Option<PathBuf>,
        #[arg(long, value_parser = crate::units::parse_size)]
        chunk_size: Option<u64>,
    },
}

#[derive(Args, Debug)]
pub struct StatArgs {
    #[arg(long, default_value = "/var/cache/lazy-image")]
    pub cache_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct WarmArgs {
    #[command(flatten)]
    pub image: ImageArgs,
    /// Parallel requests.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
}

#[derive(Args, Debug)]
pub struct ProxyArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    #[arg(long)]
    pub upstream: SocketAddr,
    /// Added to each direction.
    #[arg(long, default_value_t = 5)]
    pub delay_ms: u64,
    /// Per-connection bandwidth limit from upstream, e.g. 4M (bytes per second).
    #[arg(long, value_parser = crate::units::parse_size)]
    pub rate: Option<u64>,
}
