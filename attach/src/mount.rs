//! Mounts (read-only, or read-write over a writable layer) and unmounts via the syscalls, and a mount-table lookup. All of them act in
//! the namespace users see (`namespace::in_host_namespace`), also from a ublk server that lives
//! in a private one.

use crate::{AttachError, AttachErrorKind, FsType};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(p: &Path) -> Result<CString, AttachError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| AttachError::new(AttachErrorKind::InvalidInput, format!("path {} contains a NUL byte", p.display())))
}

/// Mounts `dev`'s filesystem at `target`, read-write when `writable` (a writable layer's device).
pub fn mount_device(dev: &Path, target: &Path, fs: FsType, writable: bool) -> Result<(), AttachError> {
    crate::namespace::in_host_namespace(|| mount_here(dev, target, fs, writable))
}

fn mount_here(dev: &Path, target: &Path, fs: FsType, writable: bool) -> Result<(), AttachError> {
    let (src, tgt) = (cstr(dev)?, cstr(target)?);
    let fstype = CString::new(fs.name()).map_err(|_| AttachError::new(AttachErrorKind::InvalidInput, "fs name"))?;
    let data = CString::new(if writable { "" } else { fs.mount_data() })
        .map_err(|_| AttachError::new(AttachErrorKind::InvalidInput, "mount data"))?;
    let flags = if writable { 0 } else { libc::MS_RDONLY } | libc::MS_NODEV | libc::MS_NOSUID;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(AttachError::os(
            format!(
                "mounting {} ({}) {} at {}",
                dev.display(),
                fs.name(),
                if writable { "read-write" } else { "read-only" },
                target.display()
            ),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Bind-mounts `src` at `target` (nosuid, nodev; read-only when `readonly`), as a pod's view of
/// a staged volume.
pub fn bind(src: &Path, target: &Path, readonly: bool) -> Result<(), AttachError> {
    crate::namespace::in_host_namespace(|| {
        let (s, t) = (cstr(src)?, cstr(target)?);
        // SAFETY: valid NUL-terminated paths; NULL fstype/data are allowed for a bind mount.
        let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
        if rc != 0 {
            return Err(AttachError::os(
                format!("bind-mounting {} at {}", src.display(), target.display()),
                std::io::Error::last_os_error(),
            ));
        }
        // A bind mount takes its flags only from a remount.
        let flags = libc::MS_REMOUNT | libc::MS_BIND | if readonly { libc::MS_RDONLY } else { 0 } | libc::MS_NOSUID | libc::MS_NODEV;
        // SAFETY: as above.
        let rc = unsafe { libc::mount(std::ptr::null(), t.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
            return Err(AttachError::os(format!("making {} read-only", target.display()), e));
        }
        Ok(())
    })
}

/// Unmounts `target`; not mounted counts as done (idempotent teardown).
pub fn unmount(target: &Path) -> Result<(), AttachError> {
    crate::namespace::in_host_namespace(|| unmount_here(target))
}

fn unmount_here(target: &Path) -> Result<(), AttachError> {
    unmount_with(target, 0)
}

/// Detaches every mount stacked at `target` even if busy: for mounts of a filesystem whose
/// device is dead, which can only go away once its last user lets go.
pub fn unmount_detach(target: &Path) -> Result<(), AttachError> {
    crate::namespace::in_host_namespace(|| unmount_with(target, libc::MNT_DETACH))
}

/// Unmounts `target` in this process's own mount namespace (where its FUSE export is mounted,
/// which may be a private one); with `lazy`, even if busy.
pub(crate) fn unmount_own(target: &Path, lazy: bool) -> Result<(), AttachError> {
    unmount_with(target, if lazy { libc::MNT_DETACH } else { 0 })
}

/// Unmounts everything mounted at `target` (mounts can be stacked), top first.
fn unmount_with(target: &Path, flags: libc::c_int) -> Result<(), AttachError> {
    let tgt = cstr(target)?;
    for _ in 0..16 {
        if !is_mountpoint_here(target) {
            return Ok(());
        }
        // SAFETY: valid NUL-terminated path.
        if unsafe { libc::umount2(tgt.as_ptr(), flags) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(AttachError::os(format!("unmounting {}", target.display()), e));
        }
    }
    Err(AttachError::new(AttachErrorKind::Busy, format!("{} still has mounts after 16 unmounts", target.display())))
}

/// True when `path` is the mount point of some mount in the namespace users see.
pub fn is_mountpoint(path: &Path) -> Result<bool, AttachError> {
    crate::namespace::in_host_namespace(|| Ok(is_mountpoint_here(path)))
}

/// Usage of the filesystem mounted at `path`, as seen in the namespace users see (a private
/// namespace of this process may have nothing mounted there, and `statvfs` would describe the
/// filesystem below).
pub fn statvfs(path: &Path) -> Result<libc::statvfs, AttachError> {
    let c = cstr(path)?;
    crate::namespace::in_host_namespace(move || {
        let mut out = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: a valid NUL-terminated path and an output buffer of the right size.
        if unsafe { libc::statvfs(c.as_ptr(), out.as_mut_ptr()) } != 0 {
            return Err(AttachError::os(format!("statvfs {}", path.display()), std::io::Error::last_os_error()));
        }
        // SAFETY: statvfs succeeded and filled the struct.
        Ok(unsafe { out.assume_init() })
    })
}

/// The device (mount source) mounted at `path`, if any.
pub fn mount_source(path: &Path) -> Result<Option<std::path::PathBuf>, AttachError> {
    crate::namespace::in_host_namespace(|| {
        let p = canonical_bytes(path);
        Ok(mount_table().into_iter().rev().find(|m| m.mountpoint == p).map(|m| {
            use std::os::unix::ffi::OsStringExt;
            std::path::PathBuf::from(std::ffi::OsString::from_vec(m.source))
        }))
    })
}

/// Where `dev` is mounted, in the namespace users see.
pub fn mount_points_of(dev: &Path) -> Result<Vec<std::path::PathBuf>, AttachError> {
    use std::os::unix::ffi::OsStringExt;
    let d = dev.as_os_str().as_bytes().to_vec();
    crate::namespace::in_host_namespace(move || {
        Ok(mounts_of_sources(|s| s == d.as_slice())
            .into_iter()
            .map(|m| std::path::PathBuf::from(std::ffi::OsString::from_vec(m)))
            .collect())
    })
}

fn canonical_bytes(path: &Path) -> Vec<u8> {
    // A dead FUSE mount fails stat with ENOTCONN: it is still a mount point, under its own name.
    match path.canonicalize() {
        Ok(c) => c.as_os_str().as_bytes().to_vec(),
        Err(_) => path.as_os_str().as_bytes().to_vec(),
    }
}

fn is_mountpoint_here(path: &Path) -> bool {
    let p = canonical_bytes(path);
    mount_table().iter().any(|m| m.mountpoint == p)
}

/// Mount points (in this thread's namespace) whose source matches `pred`.
pub(crate) fn mounts_of_sources(pred: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    mounts_matching(|src, _| pred(src))
}

/// Mount points (in this thread's namespace) for which `pred(source, mountpoint)` holds.
pub(crate) fn mounts_matching(pred: impl Fn(&[u8], &[u8]) -> bool) -> Vec<Vec<u8>> {
    mount_table().into_iter().filter(|m| pred(&m.source, &m.mountpoint)).map(|m| m.mountpoint).collect()
}

struct MountEntry {
    mountpoint: Vec<u8>,
    source: Vec<u8>,
}

/// This thread's mount table: thread-self, because a helper thread may be in another namespace
/// than the process's main thread.
fn mount_table() -> Vec<MountEntry> {
    let Ok(info) = std::fs::read("/proc/thread-self/mountinfo") else { return Vec::new() };
    info.split(|&b| b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            let mountpoint = unescape(fields.get(4)?);
            // After the optional fields: "-", fstype, source, super options.
            let dash = fields.iter().position(|f| *f == b"-")?;
            let source = unescape(fields.get(dash + 2)?);
            Some(MountEntry { mountpoint, source })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\' && i + 3 < s.len() && s[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((s[i + 1] - b'0') * 64 + (s[i + 2] - b'0') * 8 + (s[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(super::unescape(br"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(super::unescape(b"/plain"), b"/plain");
        assert!(super::is_mountpoint(std::path::Path::new("/proc")).unwrap());
        assert!(!super::is_mountpoint(std::path::Path::new("/proc/self")).unwrap());
    }
}
