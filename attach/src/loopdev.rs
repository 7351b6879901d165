//! Read-only loop devices over the FUSE image file (or over a complete cache's data file), set
//! up with the loop ioctls rather than `losetup`, so that a device is never left bound to
//! nothing: it is configured with autoclear while we hold it open, and the kernel unbinds it
//! when its last user closes it. Until the mount has it, that last user is us (a crash or a kill
//! between attach and mount closes our fd); after, it is the mount (unmounting frees it).

use crate::{AttachError, AttachErrorKind};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

// From <linux/loop.h>.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zeroed_info() -> LoopInfo64 {
    // SAFETY: a plain-old-data struct of integers and byte arrays; all zeroes is valid.
    unsafe { std::mem::zeroed() }
}

/// Identity of a backing file as the loop driver reports it: (st_dev, st_ino).
type Backing = (u64, u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    path: PathBuf,
    /// The file this device read when we attached or found it; `None` if it was not bound.
    /// `detach` clears the device only while it still reads that file, so a device the kernel
    /// has already freed (autoclear) and someone else has taken since is left alone.
    backing: Option<Backing>,
}

/// A loop device we just configured, held open: if this is dropped before a mount takes the
/// device (an error, or the process dies), the kernel unbinds it.
pub(crate) struct LoopClaim {
    dev: LoopDevice,
    _held: File,
}

impl LoopClaim {
    pub(crate) fn device(&self) -> &LoopDevice {
        &self.dev
    }

    /// Lets go of the device once something else (the mount) keeps it bound.
    pub(crate) fn release(self) -> LoopDevice {
        self.dev
    }
}

fn open_device(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(path)
}

fn status(dev: &File) -> std::io::Result<LoopInfo64> {
    let mut info = zeroed_info();
    // SAFETY: LOOP_GET_STATUS64 fills a struct loop_info64, which `info` is laid out as.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut LoopInfo64) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info)
}

/// The file the device at `path` reads now; an error if it is not bound.
fn current_backing(path: &Path) -> std::io::Result<Backing> {
    let info = status(&open_device(path)?)?;
    Ok((info.lo_device, info.lo_inode))
}

fn is_unbound(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENXIO) | Some(libc::ENOENT) | Some(libc::ENODEV))
}

impl LoopDevice {
    /// A loop device someone set up before (found in a record or a mount table), with the file
    /// it reads now pinned for `detach`.
    pub fn existing(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let backing = current_backing(&path).ok();
        LoopDevice { path, backing }
    }

    /// Attaches the FUSE image file read-only with direct I/O, so blocks are cached once (in the
    /// filesystem above), not again in the FUSE file's page cache; buffered I/O if refused.
    pub(crate) fn attach_readonly(file: &Path) -> Result<LoopClaim, AttachError> {
        let claim = Self::attach(file, true, false)?;
        claim.dev.tune_queue();
        Ok(claim)
    }

    /// As `attach_readonly`, writable: the FUSE file of a writable layer.
    pub(crate) fn attach_writable(file: &Path) -> Result<LoopClaim, AttachError> {
        let claim = Self::attach(file, true, true)?;
        claim.dev.tune_queue();
        Ok(claim)
    }

    /// Attaches a local file read-only with buffered I/O: with direct I/O the file underneath
    /// gets no readahead, and sequential reads of a complete cache file were much slower.
    pub(crate) fn attach_file_readonly(file: &Path) -> Result<LoopClaim, AttachError> {
        Self::attach(file, false, false)
    }

    fn attach(file: &Path, direct_io: bool, writable: bool) -> Result<LoopClaim, AttachError> {
        let backing = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC)
            .open(file)
            .map_err(|e| AttachError::os(format!("opening {} for a loop device", file.display()), e))?;
        let meta = backing.metadata().map_err(|e| AttachError::os(format!("reading {}", file.display()), e))?;
        let ctl = OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/loop-control").map_err(|e| {
            let mut err = AttachError::os("opening /dev/loop-control (modprobe loop)", e);
            err.kind = AttachErrorKind::Unsupported;
            err
        })?;

        let mut config = LoopConfig { fd: backing.as_raw_fd() as u32, block_size: 0, info: zeroed_info(), reserved: [0; 8] };
        config.info.lo_flags =
            if writable { 0 } else { LO_FLAGS_READ_ONLY } | LO_FLAGS_AUTOCLEAR | if direct_io { LO_FLAGS_DIRECT_IO } else { 0 };
        let name = file.as_os_str().as_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        config.info.lo_file_name[..n].copy_from_slice(&name[..n]);

        // Another process may take the free device between our asking and configuring it.
        let mut last = None;
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let nr = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if nr < 0 {
                return Err(AttachError::os("finding a free loop device", std::io::Error::last_os_error()));
            }
            let path = PathBuf::from(format!("/dev/loop{nr}"));
            // A loop device configured through a read-only descriptor is read-only.
            let dev = OpenOptions::new()
                .read(true)
                .write(writable)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| AttachError::os(format!("opening {}", path.display()), e))?;
            let configure = |config: &LoopConfig| {
                // SAFETY: LOOP_CONFIGURE reads a struct loop_config, which `config` is laid out as;
                // the backing fd stays open for the call (the kernel takes its own reference).
                if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, config as *const LoopConfig) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            let mut res = configure(&config);
            if direct_io && res.as_ref().is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL)) {
                tracing::debug!(file = %file.display(), "loop device refused direct I/O; using buffered I/O");
                config.info.lo_flags &= !LO_FLAGS_DIRECT_IO;
                res = configure(&config);
            }
            match res {
                Ok(()) => return Ok(LoopClaim { dev: LoopDevice { path, backing: Some((meta.dev(), meta.ino())) }, _held: dev }),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                Err(e) => return Err(AttachError::os(format!("attaching {} to {}", file.display(), path.display()), e)),
            }
        }
        let e = last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY));
        Err(AttachError::os(format!("attaching {} to a loop device: every free one was taken first", file.display()), e))
    }

    /// The block layer's readahead (128 KiB by default) is what a sequential reader asks of us
    /// at a time; a larger window keeps the engine's parallel fetches busy. Requests are capped at
    /// the largest FUSE read: the loop device's own limit (1280 KiB) reached us as a 1 MiB read and
    /// a 256 KiB one.
    fn tune_queue(&self) {
        let Some(name) = self.path.file_name().and_then(|n| n.to_str()) else { return };
        let queue = format!("/sys/block/{name}/queue");
        let max_kb = (crate::fuse::MAX_WRITE >> 10).to_string();
        for (knob, value) in [("read_ahead_kb", crate::READ_AHEAD_KB), ("max_sectors_kb", max_kb.as_str())] {
            if let Err(e) = std::fs::write(format!("{queue}/{knob}"), value) {
                tracing::debug!(error = %e, "cannot set {queue}/{knob}");
            }
        }
    }

    /// True if the device read `file` when we attached or found it (the same inode, whatever
    /// path names it now).
    pub fn reads(&self, file: &Path) -> bool {
        match (self.backing, std::fs::metadata(file)) {
            (Some(b), Ok(m)) => b == (m.dev(), m.ino()),
            _ => false,
        }
    }

    /// The device number of the filesystem holding the file this device read when we attached
    /// or found it.
    pub fn backing_dev(&self) -> Option<u64> {
        self.backing.map(|b| b.0)
    }

    /// The file the kernel reads this device from, as sysfs names it (a removed file ends in
    /// " (deleted)"); `None` if the device is not bound.
    pub fn backing_file(&self) -> Option<PathBuf> {
        let name = self.path.file_name()?.to_str()?;
        let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
        Some(PathBuf::from(s.trim_end_matches('\n')))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unbinds the device if it still reads the file it read when we attached or found it; a
    /// device already unbound (autoclear after the unmount), or bound to another file since,
    /// counts as done. Still in use (mounted), it is unbound when its last user lets go.
    pub fn detach(&self) -> Result<(), AttachError> {
        let Some(ours) = self.backing else { return Ok(()) };
        let dev = match open_device(&self.path) {
            Ok(f) => f,
            Err(e) if is_unbound(&e) => return Ok(()),
            Err(e) => return Err(AttachError::os(format!("opening {}", self.path.display()), e)),
        };
        match status(&dev) {
            Ok(info) if (info.lo_device, info.lo_inode) == ours => {}
            Ok(_) => return Ok(()),
            Err(e) if is_unbound(&e) => return Ok(()),
            Err(e) => return Err(AttachError::os(format!("reading the status of {}", self.path.display()), e)),
        }
        // SAFETY: LOOP_CLR_FD takes no argument.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            if !is_unbound(&e) {
                return Err(AttachError::os(format!("detaching {}", self.path.display()), e));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether loop devices can be tested here (root, and the loop driver); says so if not,
    /// and with CI=true fails instead, as the other suites do.
    fn loop_usable() -> bool {
        // SAFETY: geteuid has no preconditions.
        let usable = (unsafe { libc::geteuid() }) == 0 && Path::new("/dev/loop-control").exists();
        if !usable {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true: loop device tests need root and /dev/loop-control");
            eprintln!("skipped: needs root and /dev/loop-control");
        }
        usable
    }

    fn is_bound(dev: &LoopDevice) -> bool {
        current_backing(dev.path()).is_ok()
    }

    fn image(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        p
    }

    /// A process killed between attaching and mounting closes its fd, which is all the kernel
    /// needs to unbind the device: nothing is left behind.
    #[test]
    fn a_device_nobody_mounted_goes_away_with_its_claim() {
        if !loop_usable() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let claim = LoopDevice::attach_file_readonly(&image(dir.path(), "a")).unwrap();
        let dev = claim.device().clone();
        assert!(is_bound(&dev));
        let ro = std::fs::read_to_string(format!("/sys/block/{}/ro", dev.path().file_name().unwrap().to_str().unwrap())).unwrap();
        assert_eq!(ro.trim(), "1", "read-only");
        drop(claim);
        assert!(!is_bound(&dev), "{} still bound after its claim was dropped", dev.path().display());
        dev.detach().expect("detaching an unbound device is done");
    }

    /// A device the kernel freed and another file took since is not ours to detach.
    #[test]
    fn detach_leaves_a_device_that_reads_another_file() {
        if !loop_usable() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let claim = LoopDevice::attach_file_readonly(&image(dir.path(), "b")).unwrap();
        let other = image(dir.path(), "c");
        let meta = std::fs::metadata(&other).unwrap();
        let stale = LoopDevice { path: claim.device().path().to_path_buf(), backing: Some((meta.dev(), meta.ino())) };
        stale.detach().unwrap();
        assert!(is_bound(claim.device()), "a device reading another file was detached");
        // Held open by the claim: detach marks it to go when the claim does.
        claim.device().detach().unwrap();
        let dev = claim.release();
        assert!(!is_bound(&dev));
    }

    /// A device found later knows its file by inode: under a new name it is still that file,
    /// and a new file under the old name is not.
    #[test]
    fn a_found_device_reads_its_file_whatever_its_name() {
        if !loop_usable() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let first = image(dir.path(), "d");
        let claim = LoopDevice::attach_file_readonly(&first).unwrap();
        let found = LoopDevice::existing(claim.device().path());
        assert!(found.reads(&first));
        let renamed = dir.path().join("e");
        std::fs::rename(&first, &renamed).unwrap();
        image(dir.path(), "d");
        assert!(found.reads(&renamed), "renamed, still the file the device reads");
        assert!(!found.reads(&first), "a new file under the old name");
        assert!(!found.reads(&dir.path().join("missing")));
        claim.device().detach().unwrap();
    }
}
