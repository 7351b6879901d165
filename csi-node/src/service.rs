//! The CSI Identity and Node services: each call checks its request (ids, paths, capability,
//! attributes), hands typed arguments to `Volumes`, and turns the outcome into a response. The
//! only error conversion is `NodeError -> Status` (in `error`).

use crate::config::DRIVER_NAME;
use crate::error::{NodeError, NodeResult};
use crate::spec::{self, Credentials, VolumeSpec, EPHEMERAL_KEY};
use crate::volumes::{StageArgs, Volumes};
use lazy_image_attach::{Backend, FsType};
use lazy_image_proto::csi::v1 as csi;
use lazy_image_proto::csi::v1::volume_capability::AccessType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct Identity {
    pub ready: Arc<AtomicBool>,
    pub backend: Backend,
}

/// Why the block backend cannot be used right now, if it cannot.
fn backend_problem(backend: Backend) -> Option<String> {
    match backend {
        Backend::Ublk if !lazy_image_attach::ublk::available() => Some("/dev/ublk-control is missing (modprobe ublk_drv)".into()),
        Backend::Fuse if !Path::new("/dev/fuse").exists() => Some("/dev/fuse is missing (modprobe fuse)".into()),
        Backend::Fuse if !Path::new("/dev/loop-control").exists() => Some("/dev/loop-control is missing (modprobe loop)".into()),
        _ => None,
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(&self, _r: Request<csi::GetPluginInfoRequest>) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::from([("backend".to_string(), self.backend.name().to_string())]),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _r: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{service::Type, Service, Type as Cap};
        // Volumes live on the node that fetched them: report the node as a topology segment.
        let cap = csi::PluginCapability { r#type: Some(Cap::Service(Service { r#type: Type::VolumeAccessibilityConstraints as i32 })) };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities: vec![cap] }))
    }

    async fn probe(&self, _r: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        if let Some(why) = backend_problem(self.backend) {
            return Err(Status::failed_precondition(format!("the {} backend is not usable: {why}", self.backend.name())));
        }
        // Not ready while volumes from before a restart are being re-adopted.
        Ok(Response::new(csi::ProbeResponse { ready: Some(self.ready.load(Ordering::SeqCst)) }))
    }
}

pub struct Node {
    pub volumes: Arc<Volumes>,
    pub node_id: String,
    pub topology_key: String,
    pub kubelet_root: PathBuf,
    pub max_volumes: i64,
}

/// Turns a call's outcome into its answer; every refusal is logged with the volume and the
/// reason (kubelet shows only some of them, and only to whoever describes the pod).
#[allow(clippy::result_large_err)] // what every tonic method returns
fn answer<T>(call: &str, volume_id: &str, r: NodeResult<T>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| {
        tracing::warn!(call, volume_id, kind = ?e.kind, reason = %e.message, "request refused");
        Status::from(e)
    })
}

fn fs_type_of(cap: Option<&csi::VolumeCapability>) -> Option<FsType> {
    match cap.and_then(|c| c.access_type.as_ref()) {
        Some(AccessType::Mount(m)) if !m.fs_type.is_empty() => m.fs_type.parse().ok(),
        _ => None,
    }
}

impl Node {
    fn stage_args(
        &self,
        volume_id: &str,
        staging_path: PathBuf,
        cap: Option<&csi::VolumeCapability>,
        context: &HashMap<String, String>,
        secrets: &HashMap<String, String>,
    ) -> NodeResult<StageArgs> {
        let mut spec = VolumeSpec::from_attributes(context)?;
        spec.writable = spec::access::writable(cap, spec.writable)?;
        if !spec.writable {
            spec.writable_size = None;
        }
        Ok(StageArgs {
            volume_id: volume_id.to_string(),
            staging_path,
            spec,
            credentials: Credentials::from_secrets(secrets)?,
            fs_type: fs_type_of(cap),
        })
    }

    async fn publish(&self, r: csi::NodePublishVolumeRequest) -> NodeResult<()> {
        spec::check_volume_id(&r.volume_id)?;
        let target = spec::check_path("target_path", &r.target_path, &self.kubelet_root)?;
        let writes = spec::access::publish_writes(r.volume_capability.as_ref(), r.readonly)?.map(|m| m.as_str_name());
        let ephemeral = r.volume_context.get(EPHEMERAL_KEY).is_some_and(|v| v == "true");
        if ephemeral {
            let mut context = r.volume_context.clone();
            context.retain(|k, _| k != EPHEMERAL_KEY);
            let staging = self.volumes.ephemeral_staging(&r.volume_id);
            let args = self.stage_args(&r.volume_id, staging, r.volume_capability.as_ref(), &context, &r.secrets)?;
            return self.volumes.publish(&r.volume_id, None, &target, writes, Some(args)).await;
        }
        let staging = spec::check_path("staging_target_path", &r.staging_target_path, &self.kubelet_root)?;
        self.volumes.publish(&r.volume_id, Some(&staging), &target, writes, None).await
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    /// MUST be idempotent: staging a volume that is staged with the same arguments succeeds
    /// without doing anything; other arguments get ALREADY_EXISTS.
    async fn node_stage_volume(&self, r: Request<csi::NodeStageVolumeRequest>) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = r.into_inner();
        let run = async {
            spec::check_volume_id(&r.volume_id)?;
            let staging = spec::check_path("staging_target_path", &r.staging_target_path, &self.kubelet_root)?;
            spec::access::check(r.volume_capability.as_ref())?;
            let args = self.stage_args(&r.volume_id, staging, r.volume_capability.as_ref(), &r.volume_context, &r.secrets)?;
            self.volumes.stage(args).await
        };
        answer("NodeStageVolume", &r.volume_id, run.await.map(|()| csi::NodeStageVolumeResponse {}))
    }

    /// MUST be idempotent: unstaging a volume that is not staged succeeds.
    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = r.into_inner();
        let run = async {
            spec::check_volume_id(&r.volume_id)?;
            let staging = spec::check_path("staging_target_path", &r.staging_target_path, &self.kubelet_root)?;
            self.volumes.unstage(&r.volume_id, &staging).await
        };
        answer("NodeUnstageVolume", &r.volume_id, run.await.map(|()| csi::NodeUnstageVolumeResponse {}))
    }

    /// MUST be idempotent: publishing at a target already published succeeds.
    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = r.volume_id.clone();
        answer("NodePublishVolume", &id, self.publish(r).await.map(|()| csi::NodePublishVolumeResponse {}))
    }

    /// MUST be idempotent: unpublishing a target that is not mounted succeeds.
    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let run = async {
            spec::check_volume_id(&r.volume_id)?;
            let target = spec::check_path("target_path", &r.target_path, &self.kubelet_root)?;
            self.volumes.unpublish(&r.volume_id, &target).await
        };
        answer("NodeUnpublishVolume", &r.volume_id, run.await.map(|()| csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = r.into_inner();
        let run = || -> NodeResult<csi::NodeGetVolumeStatsResponse> {
            spec::check_volume_id(&r.volume_id)?;
            if r.volume_path.is_empty() {
                return Err(NodeError::invalid("volume_path is required"));
            }
            let path = PathBuf::from(&r.volume_path);
            let st = self.volumes.stats(&r.volume_id, &path)?;
            let usage = |unit: csi::volume_usage::Unit, total: u64, used: u64, avail: u64| csi::VolumeUsage {
                available: avail as i64,
                total: total as i64,
                used: used as i64,
                unit: unit as i32,
            };
            Ok(csi::NodeGetVolumeStatsResponse {
                usage: vec![
                    usage(csi::volume_usage::Unit::Bytes, st.bytes_total, st.bytes_used, st.bytes_available),
                    usage(csi::volume_usage::Unit::Inodes, st.inodes_total, st.inodes_used, st.inodes_available),
                ],
                volume_condition: Some(csi::VolumeCondition { abnormal: st.abnormal, message: st.message }),
            })
        };
        answer("NodeGetVolumeStats", &r.volume_id, run())
    }

    async fn node_expand_volume(
        &self,
        _r: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("lazy-image volumes are read-only images and cannot be expanded"))
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{rpc::Type, Rpc, Type as Cap};
        let caps = [Type::StageUnstageVolume, Type::GetVolumeStats, Type::VolumeCondition]
            .into_iter()
            .map(|t| csi::NodeServiceCapability { r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })) })
            .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities: caps }))
    }

    async fn node_get_info(&self, _r: Request<csi::NodeGetInfoRequest>) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(csi::Topology { segments: HashMap::from([(self.topology_key.clone(), self.node_id.clone())]) }),
        }))
    }
}
