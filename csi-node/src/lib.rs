//! lazy-image CSI node plugin (`lazy-image.csi.dev`): the per-host daemon kubelet calls over a
//! Unix socket. `service` speaks CSI (Identity + Node), `volumes` does the work (stage, publish,
//! re-adopt after a restart) on top of the engine and the attach backends (ublk, or FUSE + loop),
//! `state` persists what a restarted plugin needs, `metrics` exports Prometheus counters,
//! `reporter` reads warm orders and reports the node's caches (only with a Kubernetes API).
//!
//! The process moves into a private mount namespace at start (a ublk server must never hold a
//! mount of its own device); mounts kubelet must see are made from the namespace it started in.
//! On SIGTERM it stops answering and exits without unstaging anything: an upgraded plugin takes
//! the volumes over (ublk devices are held by the kernel meanwhile).

pub mod config;
pub mod error;
pub mod fd_holder;
pub mod local;
pub mod metrics;
pub mod reporter;
pub mod service;
pub mod spec;
pub mod state;
pub mod volumes;

use config::Args;
use lazy_image_attach::{Backend, UblkOptions};
use lazy_image_proto::csi::v1::identity_server::IdentityServer;
use lazy_image_proto::csi::v1::node_server::NodeServer;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use volumes::{NodeConfig, Volumes};

pub type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// The fd holder FUSE+loop volumes hand their sessions to, as --fd-holder says.
fn fd_holder_client(args: &Args) -> Result<Option<fd_holder::HolderClient>, AnyError> {
    let socket = args.fd_holder_socket.clone().unwrap_or_else(|| args.state_dir.join("fd-holder.sock"));
    let spawn = match args.fd_holder.as_str() {
        "off" => return Ok(None),
        "external" => None,
        _ => Some(std::env::current_exe()?.with_file_name("lazy-image-fd-holder")),
    };
    Ok(Some(fd_holder::HolderClient::new(socket, spawn)))
}

/// Records a Warning event on this node's Node object, when the plugin runs in a cluster (an
/// in-cluster account or a kubeconfig); elsewhere the log line is all there is.
async fn node_event(node: String, reason: &'static str, note: String) {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let Ok(client) = kube::Client::try_default().await else { return };
    let reporter = Reporter { controller: "lazy-image-csi-node".into(), instance: Some(node.clone()) };
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node),
        ..Default::default()
    };
    let ev = Event { type_: EventType::Warning, reason: reason.into(), note: Some(note), action: "SelectBackend".into(), secondary: None };
    if let Err(e) = Recorder::new(client, reporter).publish(&ev, &reference).await {
        tracing::warn!(error = %e, "cannot record the event on the node");
    }
}

pub fn run(args: Args) -> Result<(), AnyError> {
    let choice: lazy_image_attach::BackendChoice = args.backend.parse()?;
    let backend = Backend::resolve(choice)?;
    let socket = config::socket_path(&args.endpoint)?;
    if args.node_id.is_empty() {
        return Err("--node-id (or NODE_NAME) must not be empty".into());
    }
    // Before any thread exists.
    std::fs::create_dir_all(&args.state_dir)?;
    let kubelet_root = args.kubelet_root.canonicalize().unwrap_or_else(|_| args.kubelet_root.clone());
    let state_dir = args.state_dir.canonicalize()?;
    lazy_image_attach::namespace::enter_private_mount_namespace(&[&kubelet_root, &state_dir])?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("csi-node").build()?;
    rt.block_on(serve(args, backend, socket))
}

async fn serve(args: Args, backend: Backend, socket: std::path::PathBuf) -> Result<(), AnyError> {
    let volumes = Volumes::new(NodeConfig {
        state_dir: args.state_dir.clone(),
        cache_dir: args.cache_dir.clone(),
        cache_limit: args.cache_limit,
        backend,
        ublk: UblkOptions { queues: args.ublk_queues, depth: args.ublk_depth, ..UblkOptions::default() },
        max_volumes: args.max_volumes_per_node as usize,
        fd_holder: fd_holder_client(&args)?,
        local: local::LocalSources::new(&args.local_source_root, &args.local_source_device)?,
    })?;
    tracing::info!(backend = backend.name(), node_id = %args.node_id, "starting lazy-image CSI node plugin");
    if backend == Backend::Fuse && args.backend == "auto" {
        let why = format!(
            "ublk is not available ({} is missing: the kernel needs Linux 6.0+ with ublk_drv loaded): volumes use FUSE + loop, \
             and a plugin restart keeps them only through the fd holder",
            lazy_image_attach::ublk::CONTROL_PATH
        );
        tracing::warn!("{why}");
        tokio::spawn(node_event(args.node_id.clone(), "UblkUnavailable", why));
    }

    let incoming = lazy_image_csi_common::listen(&socket)?;

    if let Some(addr) = args.metrics_addr {
        let v = volumes.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(addr, v).await {
                tracing::error!(%addr, error = %e, "metrics endpoint stopped");
            }
        });
    }

    // Answer Identity at once (Probe says "not ready"), re-adopt volumes, then be ready.
    let ready = Arc::new(AtomicBool::new(false));
    let identity = service::Identity { ready: ready.clone(), backend };
    let node = service::Node {
        volumes: volumes.clone(),
        node_id: args.node_id.clone(),
        topology_key: args.topology_key.clone(),
        kubelet_root: args.kubelet_root.clone(),
        max_volumes: args.max_volumes_per_node as i64,
    };
    let v = volumes.clone();
    let r = ready.clone();
    tokio::spawn(async move {
        v.recover_all().await;
        r.store(true, Ordering::SeqCst);
        tracing::info!("ready");
        v.retry_broken(std::time::Duration::from_secs(10)).await;
    });
    if args.cache_reports == "auto" {
        match kube::Client::try_default().await {
            Ok(client) => {
                let timing = reporter::Timing {
                    policy: lazy_image_csi_common::reports::ReportPolicy {
                        min_interval: std::time::Duration::from_secs(args.report_min_interval_s),
                        heartbeat: std::time::Duration::from_secs(args.report_heartbeat_s),
                    },
                    poll: std::time::Duration::from_secs(args.orders_poll_s),
                };
                tokio::spawn(reporter::Reporter::new(client, &args.node_id, volumes.clone(), timing).run());
            }
            Err(e) => tracing::info!(error = %e, "no Kubernetes API: cache reports and warm orders are off"),
        }
    }

    let shutdown = async {
        lazy_image_csi_common::shutdown_signal().await;
        tracing::info!("shutting down; staged volumes stay for the next plugin to take over");
    };
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
