//! CSI Identity and Controller as the external-provisioner calls them: each call checks its
//! request, hands typed arguments to `Provisioner`, and turns the outcome into an answer. The
//! only error conversion is `ControllerError -> Status` (in `error`).

use crate::error::{ControllerError, Result};
use crate::provision::{CreateArgs, Provisioner, Volume};
use lazy_image_csi_common::DRIVER_NAME;
use lazy_image_proto::csi::v1 as csi;
use lazy_image_proto::csi::v1::volume_capability::access_mode::Mode;
use lazy_image_proto::csi::v1::volume_capability::AccessType;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct Identity;

#[tonic::async_trait]
impl csi::identity_server::Identity for Identity {
    async fn get_plugin_info(&self, _r: Request<csi::GetPluginInfoRequest>) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _r: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{service::Type, Service, Type as Cap};
        let cap = csi::PluginCapability { r#type: Some(Cap::Service(Service { r#type: Type::ControllerService as i32 })) };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities: vec![cap] }))
    }

    async fn probe(&self, _r: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

pub struct Controller {
    pub provisioner: Arc<Provisioner>,
}

/// lazy-image volumes are filesystems: every capability asked for must be mount access, with a
/// reader's mode, or a single node's writer mode for a writable volume (its changes live on one
/// node). The message ends up in `kubectl describe pvc`.
fn check_capabilities(caps: &[csi::VolumeCapability], writable: bool) -> Result<()> {
    if caps.is_empty() {
        return Err(ControllerError::invalid("volume_capabilities is required"));
    }
    for cap in caps {
        match &cap.access_type {
            Some(AccessType::Mount(_)) => {}
            Some(AccessType::Block(_)) => {
                return Err(ControllerError::invalid(
                    "lazy-image volumes are filesystems: the claim must ask for volumeMode Filesystem, not Block",
                ))
            }
            None => return Err(ControllerError::invalid("a volume capability has neither mount nor block access")),
        }
        let mode = cap.access_mode.as_ref().map(|m| m.mode).unwrap_or_default();
        match Mode::try_from(mode) {
            Ok(Mode::SingleNodeReaderOnly) | Ok(Mode::MultiNodeReaderOnly) => {}
            Ok(Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter) if writable => {}
            Ok(m) if writable => {
                return Err(ControllerError::invalid(format!(
                    "a writable lazy-image volume is written on one node: the claim must ask for ReadWriteOnce, ReadWriteOncePod or ReadOnlyMany (it asked for access mode {})",
                    m.as_str_name()
                )))
            }
            Ok(m) => {
                return Err(ControllerError::invalid(format!(
                    "lazy-image volumes are read-only images: the claim must ask for ReadOnlyMany, or set writable: \"true\" in the storage class for ReadWriteOnce (it asked for access mode {})",
                    m.as_str_name()
                )))
            }
            Err(_) => return Err(ControllerError::invalid(format!("access mode {mode} is unknown"))),
        }
    }
    Ok(())
}

fn to_csi(v: Volume) -> csi::Volume {
    csi::Volume { capacity_bytes: v.capacity_bytes as i64, volume_id: v.volume_id, volume_context: v.context, ..Default::default() }
}

/// Logs a refusal with the volume and reason, and answers it.
#[allow(clippy::result_large_err)] // what every tonic method returns
fn answer<T>(call: &str, volume: &str, r: Result<T>) -> Result<Response<T>, Status> {
    r.map(Response::new).map_err(|e| {
        tracing::warn!(call, volume, kind = ?e.kind, reason = %e.message, "request refused");
        Status::from(e)
    })
}

fn size(field: &str, n: i64) -> Result<u64> {
    u64::try_from(n).map_err(|_| ControllerError::invalid(format!("{field} {n} is negative")))
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    /// MUST be idempotent: a repeated call with the same name and arguments gets the same volume.
    async fn create_volume(&self, r: Request<csi::CreateVolumeRequest>) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = r.into_inner();
        let run = async {
            if r.name.is_empty() {
                return Err(ControllerError::invalid("name is required"));
            }
            check_capabilities(&r.volume_capabilities, r.parameters.get("writable").is_some_and(|w| w == "true"))?;
            if r.volume_content_source.is_some() {
                return Err(ControllerError::invalid(
                    "lazy-image volumes cannot be made from a snapshot or another volume: their content is the image",
                ));
            }
            let range = r.capacity_range.unwrap_or_default();
            let args = CreateArgs {
                name: r.name.clone(),
                required_bytes: size("capacity_range.required_bytes", range.required_bytes)?,
                limit_bytes: size("capacity_range.limit_bytes", range.limit_bytes)?,
                parameters: r.parameters.clone(),
                secrets: r.secrets.clone(),
            };
            let v = self.provisioner.create(args).await?;
            Ok(csi::CreateVolumeResponse { volume: Some(to_csi(v)) })
        };
        answer("CreateVolume", &r.name, run.await)
    }

    /// MUST be idempotent: an unknown volume is deleted already.
    async fn delete_volume(&self, r: Request<csi::DeleteVolumeRequest>) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = r.into_inner();
        answer("DeleteVolume", &r.volume_id, self.provisioner.delete(&r.volume_id).map(|()| csi::DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = r.into_inner();
        let run = || {
            if r.volume_id.is_empty() {
                return Err(ControllerError::invalid("volume_id is required"));
            }
            // A volume is known by the context it was given, even to a controller that
            // restarted since: that context must be one the node plugin stages.
            let context = match (self.provisioner.get(&r.volume_id), r.volume_context.is_empty()) {
                (Some(v), _) => v.context,
                (None, false) => r.volume_context.clone(),
                (None, true) => {
                    return Err(ControllerError::new(
                        crate::error::Kind::NotFound,
                        format!("volume {} is not known to this controller", r.volume_id),
                    ))
                }
            };
            let spec = lazy_image_csi_common::attributes::VolumeSpec::from_attributes(&context)?;
            let mut out = csi::ValidateVolumeCapabilitiesResponse::default();
            match check_capabilities(&r.volume_capabilities, spec.writable) {
                Ok(()) => {
                    out.confirmed = Some(csi::validate_volume_capabilities_response::Confirmed {
                        volume_context: r.volume_context.clone(),
                        volume_capabilities: r.volume_capabilities.clone(),
                        parameters: r.parameters.clone(),
                        mutable_parameters: r.mutable_parameters.clone(),
                    })
                }
                Err(e) if r.volume_capabilities.is_empty() => return Err(e),
                Err(e) => out.message = e.message,
            }
            Ok(out)
        };
        answer("ValidateVolumeCapabilities", &r.volume_id, run())
    }

    async fn list_volumes(&self, r: Request<csi::ListVolumesRequest>) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = r.into_inner();
        let run = || {
            let max = usize::try_from(r.max_entries)
                .map_err(|_| ControllerError::invalid(format!("max_entries {} is negative", r.max_entries)))?;
            let (page, next) = self.provisioner.list(&r.starting_token, max)?;
            let entries = page.into_iter().map(|v| csi::list_volumes_response::Entry { volume: Some(to_csi(v)), status: None }).collect();
            Ok(csi::ListVolumesResponse { entries, next_token: next.unwrap_or_default() })
        };
        answer("ListVolumes", "", run())
    }

    async fn controller_get_capabilities(
        &self,
        _r: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        let caps = [Type::CreateDeleteVolume, Type::ListVolumes]
            .into_iter()
            .map(|t| csi::ControllerServiceCapability { r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })) })
            .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse { capabilities: caps }))
    }
}
