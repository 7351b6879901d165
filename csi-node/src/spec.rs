//! What the node plugin checks of a request beyond its volume attributes (`attributes`, shared
//! with the controller): the paths kubelet sends and the access it asks for.

use crate::error::{NodeError, NodeResult};
use lazy_image_attach::FsType;
pub use lazy_image_csi_common::attributes::{check_volume_id, Credentials, VolumeSpec, EPHEMERAL_KEY};
use std::path::{Component, Path, PathBuf};

/// A staging or target path: absolute, without `.`/`..`, under the kubelet root.
pub fn check_path(field: &str, p: &str, kubelet_root: &Path) -> NodeResult<PathBuf> {
    if p.is_empty() {
        return Err(NodeError::invalid(format!("{field} is required")));
    }
    let path = PathBuf::from(p);
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
        return Err(NodeError::invalid(format!("{field} {p:?} must be an absolute path without . or ..")));
    }
    if !path.starts_with(kubelet_root) || path == kubelet_root {
        return Err(NodeError::invalid(format!("{field} {p:?} is not under the kubelet root {}", kubelet_root.display())));
    }
    Ok(path)
}

/// Access kubelet may ask for. The device and every mount are read-only whatever the mode, but
/// for a volume whose attributes say `writable: "true"` staged with a single node's writer mode.
/// kubelet sends SINGLE_NODE_WRITER for every inline volume and for a PV whose first access mode
/// is ReadWriteOnce, with `readonly` set when the pod or the PV says `readOnly: true`. Only
/// mount (not block) access.
pub mod access {
    use super::*;
    use lazy_image_proto::csi::v1::volume_capability::access_mode::Mode;
    use lazy_image_proto::csi::v1::volume_capability::AccessType;
    use lazy_image_proto::csi::v1::VolumeCapability;

    /// Checks the capability; returns the mode when it is a writer's.
    pub fn check(cap: Option<&VolumeCapability>) -> NodeResult<Option<Mode>> {
        let cap = cap.ok_or_else(|| NodeError::invalid("volume_capability is required"))?;
        match &cap.access_type {
            Some(AccessType::Mount(m)) => {
                if !m.fs_type.is_empty() && m.fs_type.parse::<FsType>().is_err() {
                    return Err(NodeError::invalid(format!(
                        "fs_type {:?} is not supported (ext4, erofs, squashfs, or empty for the image's own)",
                        m.fs_type
                    )));
                }
            }
            Some(AccessType::Block(_)) => {
                return Err(NodeError::invalid("block access is not supported: lazy-image volumes are mounted filesystems"))
            }
            None => return Err(NodeError::invalid("volume_capability has neither mount nor block access")),
        }
        let mode = cap.access_mode.as_ref().map(|m| m.mode).unwrap_or_default();
        match Mode::try_from(mode) {
            Ok(Mode::SingleNodeReaderOnly) | Ok(Mode::MultiNodeReaderOnly) => Ok(None),
            Ok(Mode::Unknown) => Err(NodeError::invalid("volume_capability has no access mode")),
            Ok(m) => Ok(Some(m)),
            Err(_) => Err(NodeError::invalid(format!("access mode {mode} is unknown"))),
        }
    }

    /// Whether a volume whose attributes say `writable` is writable with this capability: with
    /// a single node's writer mode, yes; with a reader's mode, no (its device stays read-only);
    /// a writer's mode on many nodes is refused, since a volume's changes live on one node.
    pub fn writable(cap: Option<&VolumeCapability>, asked: bool) -> NodeResult<bool> {
        match check(cap)? {
            _ if !asked => Ok(false),
            None => Ok(false),
            Some(Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter) => Ok(true),
            Some(m) => Err(NodeError::invalid(format!(
                "access mode {} writes from many nodes, and a writable lazy-image volume's changes live on the node that stages it: \
                 use ReadWriteOnce or ReadWriteOncePod",
                m.as_str_name()
            ))),
        }
    }

    /// NodePublishVolume: whether the pod writes (a writer's mode without `readonly`). A volume
    /// that is not writable serves a writer's mode only read-only (`Volumes::publish` says so).
    pub fn publish_writes(cap: Option<&VolumeCapability>, readonly: bool) -> NodeResult<Option<Mode>> {
        Ok(check(cap)?.filter(|_| !readonly))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let root = Path::new("/var/lib/kubelet");
        assert!(check_path("target_path", "/var/lib/kubelet/pods/x/vol", root).is_ok());
        for bad in ["", "relative", "/etc/passwd", "/var/lib/kubelet", "/var/lib/kubelet/../x", "/var/lib/kubeletx/y"] {
            assert!(check_path("target_path", bad, root).is_err(), "{bad:?}");
        }
    }
}
