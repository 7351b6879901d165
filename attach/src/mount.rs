//! Read-only mounts and unmounts via the syscalls, and a mount-table lookup.

use crate::{AttachError, AttachErrorKind, FsType};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(p: &Path) -> Result<CString, AttachError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| AttachError::new(AttachErrorKind::InvalidInput, format!("path {} contains a NUL byte", p.display())))
}

pub fn mount_readonly(dev: &Path, target: &Path, fs: FsType) -> Result<(), AttachError> {
    let (src, tgt) = (cstr(dev)?, cstr(target)?);
    let fstype = CString::new(fs.name()).map_err(|_| AttachError::new(AttachErrorKind::InvalidInput, "fs name"))?;
    let data = CString::new(fs.mount_data()).map_err(|_| AttachError::new(AttachErrorKind::InvalidInput, "mount data"))?;
    let flags = libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID;
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(AttachError::os(
            format!("mounting {} ({}) read-only at {}", dev.display(), fs.name(), target.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Unmounts `target`; not mounted counts as done (idempotent teardown).
pub fn unmount(target: &Path) -> Result<(), AttachError> {
    if !is_mountpoint(target)? {
        return Ok(());
    }
    let tgt = cstr(target)?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(tgt.as_ptr(), 0) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(AttachError::os(format!("unmounting {}", target.display()), e));
    }
    Ok(())
}

/// True when `path` is the mount point of some mount in this process's namespace.
pub fn is_mountpoint(path: &Path) -> Result<bool, AttachError> {
    let Ok(canon) = path.canonicalize() else {
        // A dead FUSE mount fails stat with ENOTCONN: it is still a mount point.
        return Ok(mounted_at(path.as_os_str().as_bytes()));
    };
    Ok(mounted_at(canon.as_os_str().as_bytes()))
}

fn mounted_at(p: &[u8]) -> bool {
    let Ok(info) = std::fs::read("/proc/self/mountinfo") else { return false };
    info.split(|&b| b == b'\n').any(|line| {
        line.split(|&b| b == b' ').nth(4).is_some_and(|mp| unescape(mp) == p)
    })
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
