//! Node-local sources: `file:///path` URLs and `device` volumes (a dataset on an NFS or CephFS
//! mount every node has, a shared SAN LUN). Anyone who can create a PV or an inline volume names
//! the path, so they are refused unless the operator allowed them (`--local-source-root DIR`,
//! `--local-source-device PATTERN`). A path is resolved (symlinks, `..`) before it is checked,
//! and a file is then opened beneath its root with no symlink followed, so a path swapped after
//! the check cannot lead out of it.

use crate::error::{NodeError, NodeErrorKind, NodeResult};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Default)]
pub struct LocalSources {
    roots: Vec<PathBuf>,
    devices: Vec<glob::Pattern>,
}

fn denied(message: String) -> NodeError {
    NodeError::new(NodeErrorKind::PermissionDenied, message)
}

/// `*` and `?` never match a `/` or a leading `.`: `/dev/disk/by-id/*` does not reach `..`.
const MATCH: glob::MatchOptions =
    glob::MatchOptions { case_sensitive: true, require_literal_separator: true, require_literal_leading_dot: true };

impl LocalSources {
    /// The allowlist from the plugin's flags; roots must exist (they are resolved once, here).
    pub fn new(roots: &[PathBuf], devices: &[String]) -> Result<Self, String> {
        let roots = roots
            .iter()
            .map(|r| {
                let c = r.canonicalize().map_err(|e| format!("--local-source-root {}: {e}", r.display()))?;
                if !c.is_dir() {
                    return Err(format!("--local-source-root {} is not a directory", r.display()));
                }
                Ok(c)
            })
            .collect::<Result<_, _>>()?;
        let devices = devices
            .iter()
            .map(|p| {
                if !p.starts_with("/dev/") {
                    return Err(format!("--local-source-device {p:?} must be a pattern under /dev/"));
                }
                glob::Pattern::new(p).map_err(|e| format!("--local-source-device {p:?}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(LocalSources { roots, devices })
    }

    /// Opens the regular file `path` (from a `file://` URL) if it lies under an allowed root.
    pub fn open_file(&self, path: &str) -> NodeResult<File> {
        if self.roots.is_empty() {
            return Err(denied(format!(
                "local file {path} refused: local sources are off on this node (start the plugin with --local-source-root DIR)"
            )));
        }
        let resolved = resolve(path)?;
        let Some((root, rel)) = self.roots.iter().find_map(|r| resolved.strip_prefix(r).ok().map(|rel| (r, rel))) else {
            return Err(denied(format!(
                "local file {path} (resolved: {}) is outside every --local-source-root ({})",
                resolved.display(),
                self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
            )));
        };
        let dir = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| NodeError::new(NodeErrorKind::Unavailable, format!("opening --local-source-root {}: {e}", root.display())))?;
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        let fd = rustix::fs::openat2(&dir, rel, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY, Mode::empty(), how).map_err(|e| {
            if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::XDEV {
                denied(format!("local file {path} changed while it was opened (a symlink or a path out of {})", root.display()))
            } else {
                NodeError::new(io_kind(e.kind()), format!("opening local file {path}: {e}"))
            }
        })?;
        let file = File::from(fd);
        let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        if !regular {
            return Err(NodeError::invalid(format!(
                "local file {path} is not a regular file (for a block device use volume attribute device)"
            )));
        }
        Ok(file)
    }

    /// Opens the block device `path` (attribute `device`) if it, or what it resolves to,
    /// matches an allowed pattern.
    pub fn open_device(&self, path: &str) -> NodeResult<File> {
        if self.devices.is_empty() {
            return Err(denied(format!(
                "device {path} refused: local devices are off on this node (start the plugin with --local-source-device PATTERN)"
            )));
        }
        if Path::new(path).components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(denied(format!("device {path} refused: no . or .. in device paths")));
        }
        let resolved = resolve(path)?;
        if !self.devices.iter().any(|p| p.matches_with(path, MATCH) || p.matches_path_with(&resolved, MATCH)) {
            return Err(denied(format!(
                "device {path} (resolved: {}) matches no --local-source-device ({})",
                resolved.display(),
                self.devices.iter().map(|p| p.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let fd = rustix::fs::open(&resolved, OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY, Mode::empty())
            .map_err(|e| NodeError::new(io_kind(e.kind()), format!("opening device {path}: {e}")))?;
        let file = File::from(fd);
        if !file.metadata().map(|m| m.file_type().is_block_device()).unwrap_or(false) {
            return Err(NodeError::invalid(format!("device {path} is not a block device")));
        }
        Ok(file)
    }
}

fn io_kind(k: std::io::ErrorKind) -> NodeErrorKind {
    match k {
        std::io::ErrorKind::NotFound => NodeErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => NodeErrorKind::PermissionDenied,
        _ => NodeErrorKind::InvalidArgument,
    }
}

/// The absolute path `path` names, symlinks and `..` resolved.
fn resolve(path: &str) -> NodeResult<PathBuf> {
    if !path.starts_with('/') {
        return Err(NodeError::invalid(format!("local path {path:?} must be absolute")));
    }
    Path::new(path).canonicalize().map_err(|e| NodeError::new(io_kind(e.kind()), format!("local path {path}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_only_beneath_a_root_devices_only_by_pattern() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.img"), b"a").unwrap();
        std::fs::write(tmp.path().join("secret.img"), b"s").unwrap();
        std::os::unix::fs::symlink("../../secret.img", root.join("sub/out.img")).unwrap();
        std::os::unix::fs::symlink("a.img", root.join("sub/in.img")).unwrap();
        let l = LocalSources::new(std::slice::from_ref(&root), &["/dev/null-*".into()]).unwrap();
        let p = |rel: &str| format!("{}/{rel}", root.display());
        assert!(l.open_file(&p("sub/a.img")).is_ok());
        assert!(l.open_file(&p("sub/in.img")).is_ok(), "a symlink that stays inside");
        for bad in [p("sub/out.img"), p("sub/../../secret.img"), tmp.path().join("secret.img").display().to_string()] {
            let e = l.open_file(&bad).unwrap_err();
            assert_eq!(e.kind, NodeErrorKind::PermissionDenied, "{bad}: {e}");
        }
        assert_eq!(l.open_file(&p("sub")).unwrap_err().kind, NodeErrorKind::InvalidArgument, "a directory");
        assert_eq!(l.open_file(&p("none.img")).unwrap_err().kind, NodeErrorKind::NotFound);
        for dev in ["/dev/null", "/dev/null-x/../../null", "/dev/zero"] {
            assert_eq!(l.open_device(dev).unwrap_err().kind, NodeErrorKind::PermissionDenied, "{dev}");
        }
        let off = LocalSources::default();
        assert!(off.open_file(&p("sub/a.img")).unwrap_err().to_string().contains("--local-source-root"));
        assert!(off.open_device("/dev/null").unwrap_err().to_string().contains("--local-source-device"));
        let chars = LocalSources::new(&[], &["/dev/nul?".into()]).unwrap();
        assert_eq!(chars.open_device("/dev/null").unwrap_err().kind, NodeErrorKind::InvalidArgument, "not a block device");
        assert!(LocalSources::new(&[], &["/etc/*".into()]).is_err());
        assert!(LocalSources::new(&[tmp.path().join("missing")], &[]).is_err());
    }
}
