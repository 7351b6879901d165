//! The record of a block device under a mount, as the CLI's run records and the CSI node
//! plugin's volume records keep it: which backend, which device, and what a successor needs to
//! take it over or clean it up. One type, so both decide takeovers and tear down the same way.

use crate::ublk::{self, DeviceState};
use crate::{AttachError, Attachment, FuseSessionInfo, LoopDevice};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
pub enum DeviceRecord {
    /// A ublk device: the kernel holds it for a new server when its server dies.
    Ublk { id: u32 },
    /// A loop device on the image file of a FUSE mount served by the daemon.
    Fuse {
        loop_device: PathBuf,
        fuse_dir: PathBuf,
        /// The FUSE session, when its descriptor was handed to a holder: what a successor
        /// checks before it takes the session over.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<FuseSessionInfo>,
    },
    /// A loop device on the complete cache file: works with no daemon at all.
    Loop { loop_device: PathBuf },
}

/// What a successor can do with a recorded device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Takeover {
    /// Serve the ublk device the kernel held.
    Ublk(u32),
    /// Keep the loop device on the complete cache file as it is.
    Loop(PathBuf),
    /// Take the FUSE session back from its holder and serve it.
    FuseSession { loop_device: PathBuf, fuse_dir: PathBuf, session: FuseSessionInfo },
    /// Nothing: tear down what is left and attach afresh.
    None,
}

impl DeviceRecord {
    /// The record of `att` (`session`: its FUSE session, if handed to a holder).
    pub fn of(att: &Attachment, session: Option<FuseSessionInfo>) -> Self {
        match (att.ublk_id(), att.fuse_dir()) {
            (Some(id), _) => DeviceRecord::Ublk { id },
            (None, Some(fuse_dir)) => DeviceRecord::Fuse { loop_device: att.device_path(), fuse_dir, session },
            (None, None) => DeviceRecord::Loop { loop_device: att.device_path() },
        }
    }

    /// What a new server can take over of this device, mounted at `mountpoint` by a server that
    /// is gone. A ublk device counts only if `mountpoint` is still mounted from it and the kernel
    /// holds it; the kernel does so a moment after the server's descriptors closed, so a device
    /// still live is waited for up to `settle`.
    pub fn takeover(&self, mountpoint: &Path, settle: Duration) -> Result<Takeover, AttachError> {
        match self {
            DeviceRecord::Ublk { id } => {
                let mounted_from = crate::mount_source(mountpoint)?;
                if mounted_from.as_deref() != Some(ublk::block_device_path(*id).as_path()) {
                    return Ok(Takeover::None);
                }
                let deadline = Instant::now() + settle;
                loop {
                    match ublk::device_state(*id) {
                        Ok((DeviceState::Quiesced | DeviceState::FailIo, _)) => return Ok(Takeover::Ublk(*id)),
                        Ok((DeviceState::Live, _)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                        _ => return Ok(Takeover::None),
                    }
                }
            }
            DeviceRecord::Loop { loop_device } => Ok(Takeover::Loop(loop_device.clone())),
            DeviceRecord::Fuse { loop_device, fuse_dir, session: Some(s) } => {
                Ok(Takeover::FuseSession { loop_device: loop_device.clone(), fuse_dir: fuse_dir.clone(), session: *s })
            }
            DeviceRecord::Fuse { session: None, .. } => Ok(Takeover::None),
        }
    }

    /// Removes the mount at `mountpoint` and then the device (a ublk device; a loop device and
    /// the FUSE mount under it), when no live attachment does.
    pub fn teardown(&self, mountpoint: &Path) -> Result<(), AttachError> {
        // Pinned before the unmount, which may free the device for anyone to take.
        let loop_dev = match self {
            DeviceRecord::Fuse { loop_device, .. } | DeviceRecord::Loop { loop_device } => Some(LoopDevice::existing(loop_device)),
            DeviceRecord::Ublk { .. } => None,
        };
        crate::unmount(mountpoint)?;
        if let Some(dev) = loop_dev {
            let _ = dev.detach();
        }
        match self {
            DeviceRecord::Ublk { id } => ublk::delete_device(*id)?,
            DeviceRecord::Fuse { fuse_dir, .. } => crate::unmount(fuse_dir)?,
            DeviceRecord::Loop { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run records `lazy-image mount` wrote before this type: they still load, and are
    /// written the same way.
    #[test]
    fn records_keep_their_shape() {
        for json in [
            r#"{"backend":"ublk","id":3}"#,
            r#"{"backend":"fuse","loop_device":"/dev/loop4","fuse_dir":"/c/k"}"#,
            r#"{"backend":"loop","loop_device":"/dev/loop5"}"#,
        ] {
            let rec: DeviceRecord = serde_json::from_str(json).unwrap();
            assert_eq!(serde_json::to_string(&rec).unwrap(), json);
        }
    }
}
