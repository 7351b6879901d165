//! lazy-image CSI controller (`lazy-image.csi.dev`): the cluster half. `service` speaks CSI
//! (Identity + Controller) to the external-provisioner, `provision` decides volumes from
//! StorageClass parameters and claim annotations, `crd` is the LazyImage resource, `cluster` and
//! `origin` are what provisioning reads (the API server, the image's origin).

pub mod cluster;
pub mod config;
pub mod crd;
pub mod error;
pub mod origin;
pub mod provision;
pub mod reconcile;
pub mod service;

use cluster::{Cluster, KubeCluster, NoCluster};
use config::Args;
use lazy_image_proto::csi::v1::controller_server::ControllerServer;
use lazy_image_proto::csi::v1::identity_server::IdentityServer;
use std::sync::Arc;

pub type AnyError = Box<dyn std::error::Error + Send + Sync>;

pub fn run(args: Args) -> Result<(), AnyError> {
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
    let cluster: Arc<dyn Cluster> = match &client {
        Some(c) => Arc::new(KubeCluster { client: c.clone() }),
        None => Arc::new(NoCluster),
    };
    let origin = Arc::new(origin::HttpOrigin { timeout: std::time::Duration::from_secs(args.probe_timeout_s) });
    let provisioner = Arc::new(provision::Provisioner::new(cluster, origin));
    let incoming = lazy_image_csi_common::listen(&socket)?;
    tracing::info!(socket = %socket.display(), kube = client.is_some(), "starting lazy-image CSI controller");

    let shutdown = async {
        if let Err(e) = lazy_image_csi_common::shutdown_signal().await {
            tracing::error!(error = %e, "cannot wait for signals");
            std::future::pending::<()>().await;
        }
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
