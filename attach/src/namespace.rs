//! A process that serves a block device must not hold mounts of that device: if its mount
//! namespace dies with it, the kernel unmounts, flushes to the device, and waits on the server
//! that is exiting. So a ublk server moves itself into a private mount namespace at start
//! (`/` recursively private, copies of ublk mounts detached) and makes the mounts its users see
//! from short-lived threads that re-enter the namespace it came from, with the root and working
//! directory the process had there (a caller under `chroot` gives paths that mean what they
//! mean in its root, not in the namespace's).

use crate::{AttachError, AttachErrorKind};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

/// The mount namespace this process started in, and its root and working directory there.
struct Host {
    ns: OwnedFd,
    root: OwnedFd,
    cwd: OwnedFd,
}

static HOST: OnceLock<Host> = OnceLock::new();

fn open_path(path: &str, flags: libc::c_int) -> Result<OwnedFd, AttachError> {
    let c = CString::new(path).map_err(|_| AttachError::new(AttachErrorKind::InvalidInput, "path"))?;
    // SAFETY: valid NUL-terminated path; the fd is checked and then owned.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(last_os(&format!("opening {path}")));
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn last_os(context: &str) -> AttachError {
    AttachError::os(context, std::io::Error::last_os_error())
}

/// Moves this process into a private mount namespace, remembering the current one for
/// `in_host_namespace`. Call it before any thread is started. Idempotent.
///
/// The new namespace starts as a copy of the old one. Copies of mounts this process manages
/// (ublk devices, and everything under `managed`, such as kubelet's directory) are detached:
/// a copy would pin its mount point, so that unmounting and removing it later in the host
/// namespace fails with EBUSY.
pub fn enter_private_mount_namespace(managed: &[&std::path::Path]) -> Result<(), AttachError> {
    if HOST.get().is_some() {
        return Ok(());
    }
    let host = Host {
        ns: open_path("/proc/self/ns/mnt", libc::O_RDONLY)?,
        root: open_path("/", libc::O_PATH | libc::O_DIRECTORY)?,
        cwd: open_path(".", libc::O_PATH | libc::O_DIRECTORY)?,
    };
    // SAFETY: unshare has no memory-safety preconditions.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(last_os("creating a private mount namespace (needs CAP_SYS_ADMIN)"));
    }
    let root = CString::new("/").map_err(|_| AttachError::new(AttachErrorKind::InvalidInput, "path"))?;
    // SAFETY: valid pointers; NULL source/fstype/data are allowed for a propagation change.
    let rc = unsafe { libc::mount(std::ptr::null(), root.as_ptr(), std::ptr::null(), libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) };
    if rc != 0 {
        return Err(last_os("making / private in the new mount namespace"));
    }
    // Mounts of ublk devices copied in from the old namespace (a restarted server re-adopting
    // its devices) must not live and die with us.
    use std::os::unix::ffi::OsStrExt;
    let prefixes: Vec<Vec<u8>> = managed.iter().map(|p| p.as_os_str().as_bytes().to_vec()).collect();
    let under = |mp: &[u8]| prefixes.iter().any(|p| mp.starts_with(p) && (mp.len() == p.len() || mp.get(p.len()) == Some(&b'/')));
    let mut copies = crate::mount::mounts_matching(|src, mp| src.starts_with(b"/dev/ublkb") || under(mp));
    // Deepest first, so stacked and nested mounts come off cleanly.
    copies.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mp in copies {
        if let Ok(c) = CString::new(mp) {
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = HOST.set(host);
    Ok(())
}

/// Runs `f` in the mount namespace this process started in (or right here when it never left
/// it): mounts made by `f` are the ones users and kubelet see.
pub fn in_host_namespace<T: Send>(f: impl FnOnce() -> Result<T, AttachError> + Send) -> Result<T, AttachError> {
    let Some(host) = HOST.get() else { return f() };
    let (ns, root, cwd) = (host.ns.as_raw_fd(), host.root.as_raw_fd(), host.cwd.as_raw_fd());
    std::thread::scope(|s| {
        s.spawn(move || {
            // A thread may switch mount namespace once it no longer shares its filesystem
            // context (cwd, root) with the others.
            // SAFETY: unshare/setns have no memory-safety preconditions; fd stays open (static).
            if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                return Err(last_os("unsharing the filesystem context"));
            }
            // SAFETY: as above.
            if unsafe { libc::setns(ns, libc::CLONE_NEWNS) } != 0 {
                return Err(last_os("entering the host mount namespace"));
            }
            // setns put this thread at the namespace's root: back to the process's own root
            // and working directory there (they differ under chroot).
            let dot = c".";
            // SAFETY: descriptors that stay open (static); a valid NUL-terminated path.
            if unsafe { libc::fchdir(root) } != 0 || unsafe { libc::chroot(dot.as_ptr()) } != 0 {
                return Err(last_os("returning to this process's root in the host mount namespace"));
            }
            // SAFETY: as above.
            if unsafe { libc::fchdir(cwd) } != 0 {
                return Err(last_os("returning to this process's working directory in the host mount namespace"));
            }
            f()
        })
        .join()
        .map_err(|_| AttachError::new(AttachErrorKind::Io, "mount helper thread panicked"))?
    })
}

/// True when this process moved into a private mount namespace.
pub fn is_private() -> bool {
    HOST.get().is_some()
}
