//! Per-volume state persisted under `<state-dir>/volumes/<volume_id>.json`: enough for a plugin
//! that was killed to find its devices and mounts again. Written atomically (temp + rename);
//! readable by root only, because the origin credentials are in it (a restarted plugin needs
//! them to fetch again).

use crate::error::{NodeError, NodeResult};
use crate::spec::{Credentials, VolumeSpec};
use lazy_image_attach::{Backend, DeviceRecord, FsType, FuseSessionInfo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "OnDisk", into = "OnDisk")]
pub struct VolumeRecord {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub spec: VolumeSpec,
    pub credentials: Option<Credentials>,
    pub fs: FsType,
    /// The device the staging mount is made from (the record `lazy-image mount` keeps too).
    pub device: DeviceRecord,
    /// Pods' bind mounts of this volume.
    pub targets: BTreeSet<PathBuf>,
    /// An inline ephemeral volume: staged by its (only) publish, gone with its unpublish.
    pub ephemeral: bool,
    /// A registry image's reference pinned to the manifest it resolved to at staging: a restart
    /// serves that image again, wherever its tag has moved since.
    pub resolved: Option<String>,
}

/// A volume record as it is on disk: the shape the first plugins wrote, kept so that plugins
/// older and newer than this one read each other's records (an upgrade, or a rollback).
#[derive(Serialize, Deserialize)]
struct OnDisk {
    volume_id: String,
    staging_path: PathBuf,
    spec: VolumeSpec,
    credentials: Option<Credentials>,
    fs: FsType,
    backend: Backend,
    /// ublk device id (ublk backend).
    ublk_id: Option<u32>,
    /// Loop device, and the FUSE mount under it unless the loop device reads the complete cache
    /// file (FUSE backend).
    loop_device: Option<PathBuf>,
    fuse_dir: Option<PathBuf>,
    #[serde(default)]
    fuse_session: Option<FuseSessionInfo>,
    targets: BTreeSet<PathBuf>,
    ephemeral: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resolved: Option<String>,
}

impl TryFrom<OnDisk> for VolumeRecord {
    type Error = String;
    fn try_from(d: OnDisk) -> Result<Self, String> {
        let device = match (d.ublk_id, d.loop_device, d.fuse_dir) {
            (Some(id), _, _) => DeviceRecord::Ublk { id },
            (None, Some(loop_device), Some(fuse_dir)) => DeviceRecord::Fuse { loop_device, fuse_dir, session: d.fuse_session },
            (None, Some(loop_device), None) => DeviceRecord::Loop { loop_device },
            (None, None, _) => return Err(format!("the record of volume {} names no device", d.volume_id)),
        };
        Ok(VolumeRecord {
            volume_id: d.volume_id,
            staging_path: d.staging_path,
            spec: d.spec,
            credentials: d.credentials,
            fs: d.fs,
            device,
            targets: d.targets,
            ephemeral: d.ephemeral,
            resolved: d.resolved,
        })
    }
}

impl From<VolumeRecord> for OnDisk {
    fn from(r: VolumeRecord) -> Self {
        let (backend, ublk_id, loop_device, fuse_dir, fuse_session) = match r.device {
            DeviceRecord::Ublk { id } => (Backend::Ublk, Some(id), None, None, None),
            DeviceRecord::Fuse { loop_device, fuse_dir, session } => (Backend::Fuse, None, Some(loop_device), Some(fuse_dir), session),
            DeviceRecord::Loop { loop_device } => (Backend::Fuse, None, Some(loop_device), None, None),
        };
        OnDisk {
            volume_id: r.volume_id,
            staging_path: r.staging_path,
            spec: r.spec,
            credentials: r.credentials,
            fs: r.fs,
            backend,
            ublk_id,
            loop_device,
            fuse_dir,
            fuse_session,
            targets: r.targets,
            ephemeral: r.ephemeral,
            resolved: r.resolved,
        }
    }
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> NodeResult<Self> {
        let dir = root.join("volumes");
        std::fs::create_dir_all(&dir).map_err(|e| NodeError::internal(format!("creating {}: {e}", dir.display())))?;
        std::fs::create_dir_all(root.join("ephemeral"))
            .map_err(|e| NodeError::internal(format!("creating {}/ephemeral: {e}", root.display())))?;
        Ok(StateDir { dir })
    }

    /// Where an inline ephemeral volume is staged (outside kubelet's paths).
    pub fn ephemeral_staging(&self, volume_id: &str) -> PathBuf {
        self.dir.with_file_name("ephemeral").join(volume_id)
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    pub fn save(&self, rec: &VolumeRecord) -> NodeResult<()> {
        let path = self.path(&rec.volume_id);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(rec).map_err(|e| NodeError::internal(format!("encoding state: {e}")))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_data()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| NodeError::internal(format!("writing {}: {e}", path.display())))
    }

    pub fn remove(&self, volume_id: &str) -> NodeResult<()> {
        match std::fs::remove_file(self.path(volume_id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(NodeError::internal(format!("removing state of {volume_id}: {e}"))),
        }
    }

    /// Every record; unreadable ones are reported and skipped.
    pub fn load_all(&self) -> Vec<VolumeRecord> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match std::fs::read(&p).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(path = %p.display(), error = %e, "unreadable volume state; skipping it"),
            }
        }
        out.sort_by(|a: &VolumeRecord, b| a.volume_id.cmp(&b.volume_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records as the plugins before the shared device record wrote them load, and are written
    /// back in the same shape (so a rolled-back plugin reads them too).
    #[test]
    fn records_of_every_device_keep_their_shape() {
        let spec = VolumeSpec {
            url: "http://o/x".into(),
            format: None,
            digest: None,
            manifest_url: None,
            chunk_size: None,
            prefetch: false,
            writable: false,
            writable_size: None,
        };
        let base = serde_json::json!({
            "volume_id": "v1", "staging_path": "/k/s", "spec": spec, "credentials": null, "fs": "erofs",
            "targets": ["/k/t1"], "ephemeral": false,
        });
        let merge_json = |into: &mut serde_json::Value, from: &serde_json::Value| {
            for (k, v) in from.as_object().into_iter().flatten() {
                into[k] = v.clone();
            }
        };
        let devices = [
            serde_json::json!({"backend": "ublk", "ublk_id": 3, "loop_device": null, "fuse_dir": null, "fuse_session": null}),
            serde_json::json!({"backend": "fuse", "ublk_id": null, "loop_device": "/dev/loop2", "fuse_dir": "/w/f", "fuse_session": {"dev": 7, "started": 9}}),
            serde_json::json!({"backend": "fuse", "ublk_id": null, "loop_device": "/dev/loop3", "fuse_dir": null, "fuse_session": null}),
        ];
        let kinds = ["ublk", "fuse", "loop"];
        for (dev, kind) in devices.iter().zip(kinds) {
            let mut json = base.clone();
            merge_json(&mut json, dev);
            let rec: VolumeRecord = serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"));
            let want = match kind {
                "ublk" => matches!(rec.device, DeviceRecord::Ublk { id: 3 }),
                "fuse" => matches!(rec.device, DeviceRecord::Fuse { session: Some(_), .. }),
                _ => matches!(rec.device, DeviceRecord::Loop { .. }),
            };
            assert!(want, "{kind}: {:?}", rec.device);
            assert_eq!(serde_json::to_value(&rec).unwrap(), json, "{kind}");
        }
        // An old record without fuse_session still loads; one naming no device is refused.
        let mut old = base.clone();
        merge_json(&mut old, &serde_json::json!({"backend": "ublk", "ublk_id": 1, "loop_device": null, "fuse_dir": null}));
        assert!(serde_json::from_value::<VolumeRecord>(old).is_ok());
        let mut none = base;
        merge_json(&mut none, &serde_json::json!({"backend": "fuse", "ublk_id": null, "loop_device": null, "fuse_dir": null}));
        let e = serde_json::from_value::<VolumeRecord>(none).unwrap_err().to_string();
        assert!(e.contains("names no device"), "{e}");
    }
}
