//! Per-volume state persisted under `<state-dir>/volumes/<volume_id>.json`: enough for a plugin
//! that was killed to find its devices and mounts again. Written atomically (temp + rename);
//! readable by root only, because the origin credentials are in it (a restarted plugin needs
//! them to fetch again).

use crate::error::{NodeError, NodeResult};
use crate::spec::{Credentials, VolumeSpec};
use lazy_image_attach::{Backend, FsType, FuseSessionInfo};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub spec: VolumeSpec,
    pub credentials: Option<Credentials>,
    pub fs: FsType,
    pub backend: Backend,
    /// ublk device id (ublk backend).
    pub ublk_id: Option<u32>,
    /// Loop device and FUSE mount (FUSE backend).
    pub loop_device: Option<PathBuf>,
    pub fuse_dir: Option<PathBuf>,
    /// The FUSE session, when its descriptor was handed to the fd holder: what the next
    /// plugin checks before it takes the session over.
    #[serde(default)]
    pub fuse_session: Option<FuseSessionInfo>,
    /// Pods' bind mounts of this volume.
    pub targets: BTreeSet<PathBuf>,
    /// An inline ephemeral volume: staged by its (only) publish, gone with its unpublish.
    pub ephemeral: bool,
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
