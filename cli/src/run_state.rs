//! Records of running mounts under the run directory, so `umount` can find the daemon of a mount
//! point and clean up after one that died.

use anyhow::{Context, Result};
use lazy_image_attach::{DeviceRecord, FsType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, Serialize, Deserialize)]
pub struct MountRecord {
    pub pid: u32,
    pub url: String,
    pub mountpoint: PathBuf,
    pub fs: FsType,
    pub cache_dir: PathBuf,
    /// The block device under the mount (the same record the CSI node plugin keeps).
    pub device: DeviceRecord,
    /// The writable layer's directory, for a read-write mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<PathBuf>,
}

/// A mount point's name under the run directory.
fn key(mountpoint: &Path) -> String {
    let h = hex::encode(Sha256::digest(mountpoint.as_os_str().as_encoded_bytes()));
    h[..24].to_string()
}

pub fn record_path(run_dir: &Path, mountpoint: &Path) -> PathBuf {
    run_dir.join("mounts").join(format!("{}.json", key(mountpoint)))
}

/// Where the writable layer of a read-write mount at `mountpoint` lives.
pub fn layer_dir(run_dir: &Path, mountpoint: &Path) -> PathBuf {
    run_dir.join("layers").join(key(mountpoint))
}

pub fn write(run_dir: &Path, rec: &MountRecord) -> Result<PathBuf> {
    let path = record_path(run_dir, &rec.mountpoint);
    let dir = path.parent().context("record path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(rec)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub fn read(run_dir: &Path, mountpoint: &Path) -> Result<Option<MountRecord>> {
    let path = record_path(run_dir, mountpoint);
    match std::fs::read(&path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Every record under the run directory (unreadable ones are skipped).
pub fn all(run_dir: &Path) -> Vec<MountRecord> {
    let Ok(rd) = std::fs::read_dir(run_dir.join("mounts")) else { return Vec::new() };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect()
}

pub fn remove(run_dir: &Path, mountpoint: &Path) {
    let _ = std::fs::remove_file(record_path(run_dir, mountpoint));
}

pub fn pid_alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) has finished its teardown: count it as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}
