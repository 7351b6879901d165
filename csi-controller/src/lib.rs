//! lazy-image CSI controller (`lazy-image.csi.dev`): the cluster half. `service` speaks CSI
//! (Identity + Controller) to the external-provisioner, `provision` decides volumes from
//! StorageClass parameters and claim annotations, `crd` is the LazyImage resource, `cluster` and
//! `origin` are what provisioning reads (the API server, the image's origin), `placement` and
//! `warm` keep images with a warm policy cached on chosen nodes (through NodeCache resources).

pub mod cluster;
pub mod config;
pub mod crd;
pub mod error;
pub mod leader;
pub mod origin;
pub mod placement;
pub mod provision;
pub mod reconcile;
pub mod service;
pub mod warm;

use cluster::{Cluster, KubeCluster, NoCluster};
use config::Args;
use lazy_image_proto::csi::v1::controller_server::ControllerServer;
use lazy_image_proto::csi::v1::identity_server::IdentityServer;
use std::sync::Arc;

pub type AnyError = Box<dyn std::error::Error + Send + Sync>;

/// Reconciles LazyImages and runs placement passes while this replica leads, and stops both as
/// soon as it does not.
async fn lead(ctx: Arc<reconcile::Context>, mut leading: tokio::sync::watch::Receiver<bool>) {
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        tracing::info!("leading: reconciling LazyImages");
        let lost = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|l| !*l).await;
        };
        let placing = ctx.placer.clone().map(|p| p.run(lost(leading.clone())));
        let placing = async move {
            if let Some(p) = placing {
                p.await
            }
        };
        tokio::join!(reconcile::run(ctx.clone(), lost(leading.clone())), placing);
        tracing::info!("no longer leading: stopped reconciling");
    }
}

fn render_metrics(m: &reconcile::Metrics, p: &provision::Provisioner) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let rows = [
        ("lazy_image_controller_reconciles_total", "counter", "LazyImage reconciles run.", m.reconciles.load(Relaxed)),
        ("lazy_image_controller_reconcile_errors_total", "counter", "LazyImage reconciles that failed (retried).", m.errors.load(Relaxed)),
        ("lazy_image_controller_api_writes_total", "counter", "Writes to the Kubernetes API (status, events).", m.api_writes.load(Relaxed)),
        ("lazy_image_controller_volumes", "gauge", "Volumes this controller provisioned and knows.", p.count() as u64),
    ];
    let mut out = String::new();
    for (name, kind, help, v) in rows {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
    }
    out
}

pub fn run(args: Args) -> Result<(), AnyError> {
    if !(args.api_writes_per_s > 0.0 && args.api_write_burst >= 1.0) {
        return Err(format!(
            "--api-writes-per-s must be above 0 and --api-write-burst at least 1 (got {} and {})",
            args.api_writes_per_s, args.api_write_burst
        )
        .into());
    }
    let socket = lazy_image_csi_common::socket_path(&args.endpoint)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("csi-controller").build()?;
    rt.block_on(serve(args, socket))
}

async fn serve(args: Args, socket: std::path::PathBuf) -> Result<(), AnyError> {
    let client = if args.no_kube {
        None
    } else {
        match kube::Client::try_default().await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no Kubernetes API: only StorageClass `url` parameters can name images");
                None
            }
        }
    };
    let reporter =
        kube::runtime::events::Reporter { controller: "lazy-image-csi-controller".into(), instance: Some(args.identity.clone()) };
    let cluster: Arc<dyn Cluster> = match &client {
        Some(c) => Arc::new(KubeCluster { client: c.clone(), recorder: kube::runtime::events::Recorder::new(c.clone(), reporter.clone()) }),
        None => Arc::new(NoCluster),
    };
    let origin: Arc<dyn origin::Origin> = Arc::new(origin::HttpOrigin { timeout: std::time::Duration::from_secs(args.probe_timeout_s) });
    let provisioner = Arc::new(provision::Provisioner::new(cluster.clone(), origin.clone()));
    let metrics = Arc::new(reconcile::Metrics::default());
    if let (true, Some(c)) = (args.manage_crd, client.clone()) {
        match crd::apply_crd(c).await {
            Ok(()) => tracing::info!("LazyImage and NodeCache CRDs applied"),
            Err(e) => tracing::warn!(error = %e, "cannot apply the CRDs; the cluster keeps the ones it has"),
        }
    }
    if let Some(client) = client.clone() {
        let warm = warm::WarmConfig {
            max_labels: args.warm_max_labels,
            writes_per_s: args.api_writes_per_s,
            write_burst: args.api_write_burst,
            every: std::time::Duration::from_secs(args.placement_every_s),
        };
        let recorder = kube::runtime::events::Recorder::new(client.clone(), reporter);
        let placer = Arc::new(warm::Placer::new(client.clone(), recorder.clone(), metrics.clone(), warm));
        let ctx = Arc::new(reconcile::Context {
            placer: Some(placer),
            recorder,
            client: client.clone(),
            cluster,
            origin,
            metrics: metrics.clone(),
        });
        let lease_for = std::time::Duration::from_secs(args.lease_duration_s);
        let lock = leader::LeaseLock::new(client, &args.lease_namespace, &args.lease_name, &args.identity, lease_for);
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(lock.run(tx));
        tokio::spawn(lead(ctx, rx));
    }
    if let Some(addr) = args.metrics_addr {
        let (m, p) = (metrics.clone(), provisioner.clone());
        tokio::spawn(async move {
            if let Err(e) = lazy_image_csi_common::serve_metrics(addr, Arc::new(move || render_metrics(&m, &p))).await {
                tracing::error!(%addr, error = %e, "metrics endpoint stopped");
            }
        });
    }
    let incoming = lazy_image_csi_common::listen(&socket)?;
    tracing::info!(socket = %socket.display(), kube = client.is_some(), "starting lazy-image CSI controller");

    let shutdown = async {
        lazy_image_csi_common::shutdown_signal().await;
        tracing::info!("shutting down");
    };
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(service::Identity))
        .add_service(ControllerServer::new(service::Controller { provisioner }))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}
