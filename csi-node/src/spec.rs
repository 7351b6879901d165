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

/// Access kubelet may ask for. The device and every mount are read-only whatever the mode:
/// kubelet sends SINGLE_NODE_WRITER for every inline volume and for a PV whose first access mode
/// is ReadWriteOnce, with `readonly` set when the pod or the PV says `readOnly: true`. Only
/// mount (not block) access.
pub mod access {
    use super::*;
    use lazy_image_proto::csi::v1::volume_capability::access_mode::Mode;
    use lazy_image_proto::csi::v1::volume_capability::AccessType;
    use lazy_image_proto::csi::v1::VolumeCapability;

    /// Checks the capability; returns the mode when it is a writer's (for `check_publish`).
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

    /// NodePublishVolume: a writer's mode is served read-only when the request says `readonly`;
    /// without it the pod expects to write, which an image volume cannot give.
    pub fn check_publish(cap: Option<&VolumeCapability>, readonly: bool) -> NodeResult<()> {
        match check(cap)? {
            Some(m) if !readonly => Err(NodeError::invalid(format!(
                "access mode {} without readonly asks for a writable volume, and lazy-image volumes are read-only images: \
                 set readOnly: true on the pod's csi volume (or on the PV's csi source), or give the PV the access mode ReadOnlyMany",
                m.as_str_name()
            ))),
            _ => Ok(()),
        }
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
