//! Command-line configuration of the node plugin, checked once at start.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser, Debug, Clone)]
#[command(name = "lazy-image-csi-node", version, about = "lazy-image CSI node plugin (Identity + Node services)")]
pub struct Args {
    /// gRPC endpoint kubelet and the registrar call: unix:///path/to.sock (a stale socket is
    /// replaced).
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// This node's name (the Kubernetes node name), reported by NodeGetInfo.
    #[arg(long, env = "NODE_NAME")]
    pub node_id: String,
    /// Where per-volume state is persisted so a restarted plugin re-adopts its volumes.
    #[arg(long, default_value = "/var/lib/lazy-image/node")]
    pub state_dir: PathBuf,
    /// Image caches (shared by all volumes of the node).
    #[arg(long, default_value = "/var/cache/lazy-image")]
    pub cache_dir: PathBuf,
    /// Node-wide cache limit in bytes; images not in use are evicted to stay under it.
    #[arg(long)]
    pub cache_limit: Option<u64>,
    /// Staging and target paths must lie under this directory.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,
    /// Block backend: auto (ublk when /dev/ublk-control exists), ublk or fuse.
    #[arg(long, default_value = "auto")]
    pub backend: String,
    #[arg(long, default_value_t = 1)]
    pub ublk_queues: u16,
    #[arg(long, default_value_t = 128)]
    pub ublk_depth: u16,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// FUSE+loop volumes across a plugin restart: `spawn` hands each FUSE session's descriptor
    /// to the fd holder at --fd-holder-socket, starting one (lazy-image-fd-holder, next to this
    /// binary) if none answers; `external` uses only one already running (its own container);
    /// `off` lets sessions end with the plugin, so pods' reads of uncached data fail until the
    /// pod is replaced.
    #[arg(long, default_value = "spawn", value_parser = ["spawn", "external", "off"])]
    pub fd_holder: String,
    /// The fd holder's socket; default <state-dir>/fd-holder.sock.
    #[arg(long)]
    pub fd_holder_socket: Option<PathBuf>,
    /// Volumes this node stages at once at most (each is one block device and its server);
    /// reported to kubelet as max_volumes_per_node, which the scheduler honours.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_volumes_per_node: u64,
    /// Topology key whose value is the node id (NodeGetInfo's accessible topology).
    #[arg(long, default_value = "lazy-image.csi.dev/node")]
    pub topology_key: String,
    /// Cache reports and warm orders through this node's NodeCache resource: `auto` when the
    /// plugin finds a Kubernetes API (an in-cluster account or a kubeconfig), `off` never.
    #[arg(long, default_value = "auto", value_parser = ["auto", "off"])]
    pub cache_reports: String,
    /// Seconds between two cache reports at least (changes within it go out together).
    #[arg(long, default_value_t = 60)]
    pub report_min_interval_s: u64,
    /// Seconds between two cache reports at most, changed or not (the node's sign of life).
    #[arg(long, default_value_t = 900)]
    pub report_heartbeat_s: u64,
    /// Seconds between two reads of this node's warm orders.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub orders_poll_s: u64,
    /// Allow volumes whose url is file:///PATH for files beneath DIR (repeatable; none: file
    /// URLs are refused). Paths are resolved before the check and opened with no symlink
    /// followed beneath DIR.
    #[arg(long, value_name = "DIR")]
    pub local_source_root: Vec<PathBuf>,
    /// Allow volumes whose attribute device names a block device matching PATTERN (a glob such as
    /// /dev/disk/by-id/scsi-*; `*` never crosses a `/`; repeatable; none: devices are refused).
    #[arg(long, value_name = "PATTERN")]
    pub local_source_device: Vec<String>,
    #[arg(long, default_value = "info")]
    pub log_level: String,
    #[arg(long)]
    pub log_json: bool,
}

pub use lazy_image_csi_common::DRIVER_NAME;

pub use lazy_image_csi_common::socket_path;
