//! Command-line configuration of the controller, checked once at start.

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "lazy-image-csi-controller",
    version,
    about = "lazy-image CSI controller (Identity + Controller) and LazyImage reconciler"
)]
pub struct Args {
    /// gRPC endpoint the external-provisioner calls: unix:///path/to.sock.
    #[arg(long, default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// Seconds a probe of an image's origin may take.
    #[arg(long, default_value_t = 30)]
    pub probe_timeout_s: u64,
    /// Bring the cluster's LazyImage CRD up to this build's at start (server-side apply): Helm
    /// never upgrades a chart's CRDs.
    #[arg(long)]
    pub manage_crd: bool,
    /// Run without a Kubernetes API even if one is configured (StorageClass `url` only).
    #[arg(long)]
    pub no_kube: bool,
    /// This replica's name in the leader election (the pod's name).
    #[arg(long, env = "POD_NAME", default_value = "lazy-image-csi-controller")]
    pub identity: String,
    /// The namespace of the leader election Lease (the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub lease_namespace: String,
    #[arg(long, default_value = "lazy-image-csi-controller")]
    pub lease_name: String,
    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, default_value_t = 15)]
    pub lease_duration_s: u64,
    /// Seconds between two placement passes (warm orders, warm status, warm node labels).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub placement_every_s: u64,
    /// Warm node labels (`warm.lazy-image.csi.dev/<image>`) per node at most; images by name.
    #[arg(long, default_value_t = 16)]
    pub warm_max_labels: usize,
    /// Placement writes to the API server per second on average...
    #[arg(long, default_value_t = 10.0)]
    pub api_writes_per_s: f64,
    /// ... and in a burst.
    #[arg(long, default_value_t = 20.0)]
    pub api_write_burst: f64,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    #[arg(long, default_value = "info")]
    pub log_level: String,
    #[arg(long)]
    pub log_json: bool,
}
