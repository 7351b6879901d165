//! Turns a block device view (`lazy_image_engine::View`: a `LazyImage`, or anything else that
//! serves a device's bytes) into a mounted read-only filesystem. Two block backends:
//! - ublk (`ublk`): the image is a read-only `/dev/ublkbN` served by this process, which can
//!   die and be replaced without breaking the mount (USER_RECOVERY);
//! - FUSE + loop (`fuse`, `loopdev`), where the kernel has no ublk: the image is one read-only
//!   file on a private FUSE mount, attached read-only to a loop device. When the image is
//!   already complete in the cache the loop device reads the cache's data file directly: native
//!   loop speed, and the mount no longer needs this process at all.
//!
//! Either way the filesystem is mounted read-only (`mount`), in the namespace users see
//! (`namespace`); teardown runs in reverse: filesystem, device, server.

mod error;
mod fsdetect;
mod fuse;
mod loopdev;
mod mount;
pub mod namespace;
mod record;
pub mod ublk;

pub use error::{AttachError, AttachErrorKind};
pub use fsdetect::{detect, device_block_size, FsType};
pub use fuse::{FuseExport, FuseSessionInfo, IMAGE_FILE_NAME, IO_URING_ENV as FUSE_IO_URING_ENV};
pub use loopdev::LoopDevice;
pub use mount::{bind, is_mountpoint, mount_device, mount_points_of, mount_source, statvfs, unmount, unmount_detach};
pub use record::{DeviceRecord, Takeover};
pub use ublk::{UblkDevice, UblkOptions};

use lazy_image_engine::{BlockView, View};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Locks `m` even if a panic elsewhere poisoned it: one failed request must not make every
/// later one panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Block-layer readahead set on our devices (KiB): large enough that a sequential reader keeps
/// several of the engine's ranged requests in flight.
pub(crate) const READ_AHEAD_KB: &str = "4096";

/// The block backend a user asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// ublk when the kernel has it, FUSE + loop otherwise.
    Auto,
    Ublk,
    Fuse,
}

impl FromStr for BackendChoice {
    type Err = AttachError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "ublk" => Ok(BackendChoice::Ublk),
            "fuse" => Ok(BackendChoice::Fuse),
            other => {
                Err(AttachError::new(AttachErrorKind::InvalidInput, format!("unknown backend {other:?}: expected auto, ublk or fuse")))
            }
        }
    }
}

/// The backend actually used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Ublk,
    Fuse,
}

impl Backend {
    /// Resolves a choice against this kernel; asking for ublk where there is none is an error.
    pub fn resolve(choice: BackendChoice) -> Result<Backend, AttachError> {
        match choice {
            BackendChoice::Ublk if !ublk::available() => Err(AttachError::new(
                AttachErrorKind::Unsupported,
                format!("the ublk backend needs {} (modprobe ublk_drv; kernel 6.0 or later)", ublk::CONTROL_PATH),
            )),
            BackendChoice::Ublk => Ok(Backend::Ublk),
            BackendChoice::Fuse => Ok(Backend::Fuse),
            BackendChoice::Auto if ublk::available() => Ok(Backend::Ublk),
            BackendChoice::Auto => Ok(Backend::Fuse),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Ublk => "ublk",
            Backend::Fuse => "FUSE+loop",
        }
    }
}

enum Device {
    Ublk(UblkDevice),
    /// `fuse` is `None` when the loop device reads the complete cache file directly.
    Loop {
        dev: LoopDevice,
        fuse: Option<FuseExport>,
    },
}

/// A mounted image. `detach` tears it down; dropping it without `detach` leaves it mounted on
/// purpose (a daemon that restarts must not pull the floor from under readers).
pub struct Attachment {
    pub mountpoint: PathBuf,
    pub fs: FsType,
    device: Device,
}

impl Attachment {
    /// Exposes `image` as a block device with `backend` and mounts its filesystem at
    /// `mountpoint`: read-only, or read-write when the view is writable (a writable layer). `work_dir` holds the FUSE mount of that backend. With `fuse_handover`, a
    /// FUSE session is set up to be handed to a holder and taken over by a later process
    /// (`FuseExport::start`, `fuse_handover`, `resume_fuse`). On failure everything done so far
    /// is undone.
    pub async fn attach(
        image: View,
        work_dir: &Path,
        mountpoint: &Path,
        fs: Option<FsType>,
        backend: Backend,
        ublk_opts: &UblkOptions,
        fuse_handover: bool,
    ) -> Result<Self, AttachError> {
        let fs = match fs {
            Some(f) => f,
            None => detect(&*image).await?,
        };
        let writable = image.writable();
        if writable && !fs.writable() {
            return Err(AttachError::new(
                AttachErrorKind::InvalidInput,
                format!("the image holds {}, a read-only filesystem: a writable volume needs ext4", fs.name()),
            ));
        }
        if !mountpoint.is_dir() {
            return Err(AttachError::new(
                AttachErrorKind::InvalidInput,
                format!("mount point {} is not a directory", mountpoint.display()),
            ));
        }
        if is_mountpoint(mountpoint)? {
            return Err(AttachError::new(AttachErrorKind::Busy, format!("{} is already a mount point", mountpoint.display())));
        }
        // A complete cache is a plain file holding the image: no server needed in between.
        let complete = if backend == Backend::Fuse && !writable { image.complete_file() } else { None };
        let device = match (backend, complete) {
            (Backend::Ublk, _) => {
                let opts = ublk_opts.clone();
                let block = device_block_size(&*image, fs).await?;
                let dev = blocking(move || UblkDevice::create(image, block, &opts)).await?;
                let mp = mountpoint.to_path_buf();
                let path = dev.path();
                if let Err(e) = blocking(move || mount_device(&path, &mp, fs, writable)).await {
                    let _ = blocking(move || dev.delete()).await;
                    return Err(e);
                }
                Device::Ublk(dev)
            }
            (Backend::Fuse, Some(file)) => {
                let mp = mountpoint.to_path_buf();
                let dev = blocking(move || loop_and_mount(LoopDevice::attach_file_readonly, &file, &mp, fs, false)).await?;
                Device::Loop { dev, fuse: None }
            }
            (Backend::Fuse, None) => {
                let fuse = FuseExport::start(image, &work_dir.join("fuse"), tokio::runtime::Handle::current(), fuse_handover)?;
                let mp = mountpoint.to_path_buf();
                let file = fuse.image_path();
                // Loop setup and mount block on the FUSE file, which this process serves: keep
                // them off the runtime threads that answer FUSE reads.
                let attach = if writable { LoopDevice::attach_writable } else { LoopDevice::attach_readonly };
                let res = blocking(move || loop_and_mount(attach, &file, &mp, fs, writable)).await;
                match res {
                    Ok(dev) => Device::Loop { dev, fuse: Some(fuse) },
                    Err(e) => {
                        fuse.stop();
                        return Err(e);
                    }
                }
            }
        };
        Ok(Attachment { mountpoint: mountpoint.to_path_buf(), fs, device })
    }

    /// Re-adopts ublk device `id`, whose server died with the filesystem still mounted at
    /// `mountpoint`: serves it again so the readers the kernel held get their bytes.
    pub async fn recover_ublk(image: View, id: u32, mountpoint: &Path, fs: FsType, ublk_opts: &UblkOptions) -> Result<Self, AttachError> {
        let opts = ublk_opts.clone();
        let dev = blocking(move || UblkDevice::recover(image, id, &opts)).await?;
        Ok(Attachment { mountpoint: mountpoint.to_path_buf(), fs, device: Device::Ublk(dev) })
    }

    /// Re-adopts loop device `dev` that a previous process set up on `image`'s complete cache
    /// file and mounted at `mountpoint`: it needs no server, so the mount and every reader went
    /// on undisturbed. Refused unless the mount is from `dev` and `dev` still reads the very file
    /// the cache has now (a reset would have replaced it).
    pub fn adopt_direct_loop(image: &dyn BlockView, dev: &Path, mountpoint: &Path, fs: FsType) -> Result<Self, AttachError> {
        let refuse = |why: String| Err(AttachError::new(AttachErrorKind::Busy, format!("cannot adopt {}: {why}", dev.display())));
        let Some(data) = image.complete_file() else { return refuse("the image is not complete in the cache".into()) };
        let dev = LoopDevice::existing(dev);
        if mount_source(mountpoint)?.as_deref() != Some(dev.path()) {
            return refuse(format!("{} is not mounted from it", mountpoint.display()));
        }
        // The same inode, not the same path: a path names another file once the cache is
        // rebuilt, and the device keeps reading the old one.
        if !dev.reads(&data) {
            return refuse(format!("it reads {:?}, not the cache file {}", dev.backing_file(), data.display()));
        }
        Ok(Attachment { mountpoint: mountpoint.to_path_buf(), fs, device: Device::Loop { dev, fuse: None } })
    }

    /// Serves again a FUSE+loop volume whose server died: `fd` is its session's `/dev/fuse`
    /// descriptor, kept open meanwhile by a holder (so the kernel held the readers' requests),
    /// and `info` what was recorded of it. Refused unless the filesystem at `mountpoint` is
    /// still mounted from `loop_dev` and that device still reads this session's image file.
    /// The mount, the pods' bind mounts and their open files stay as they are.
    pub fn resume_fuse(
        image: View,
        fd: std::os::fd::OwnedFd,
        info: FuseSessionInfo,
        fuse_dir: &Path,
        loop_dev: &Path,
        mountpoint: &Path,
        fs: FsType,
    ) -> Result<Self, AttachError> {
        let refuse = |why: String| Err(AttachError::new(AttachErrorKind::Busy, format!("cannot take over {}: {why}", loop_dev.display())));
        let dev = LoopDevice::existing(loop_dev);
        if mount_source(mountpoint)?.as_deref() != Some(dev.path()) {
            return refuse(format!("{} is not mounted from it", mountpoint.display()));
        }
        if dev.backing_dev() != Some(info.dev) {
            return refuse(format!("it does not read the FUSE session's file (it reads {:?})", dev.backing_file()));
        }
        let fuse = FuseExport::resume(image, fd, info, fuse_dir, tokio::runtime::Handle::current())?;
        Ok(Attachment { mountpoint: mountpoint.to_path_buf(), fs, device: Device::Loop { dev, fuse: Some(fuse) } })
    }

    /// For a FUSE+loop volume served by this process: a second descriptor of its session and
    /// what `resume_fuse` needs, for a holder to keep across a restart.
    pub fn fuse_handover(&self) -> Option<std::io::Result<(std::os::fd::OwnedFd, FuseSessionInfo)>> {
        match &self.device {
            Device::Loop { fuse: Some(fuse), .. } => Some(fuse.handover()),
            _ => None,
        }
    }

    pub fn backend(&self) -> Backend {
        match self.device {
            Device::Ublk(_) => Backend::Ublk,
            Device::Loop { .. } => Backend::Fuse,
        }
    }

    /// The block device the filesystem is mounted from.
    pub fn device_path(&self) -> PathBuf {
        match &self.device {
            Device::Ublk(d) => d.path(),
            Device::Loop { dev, .. } => dev.path().to_path_buf(),
        }
    }

    pub fn ublk_id(&self) -> Option<u32> {
        match &self.device {
            Device::Ublk(d) => Some(d.id()),
            Device::Loop { .. } => None,
        }
    }

    /// The FUSE mount of the FUSE+loop backend; `None` for ublk and for a loop device on the
    /// complete cache file.
    pub fn fuse_dir(&self) -> Option<PathBuf> {
        match &self.device {
            Device::Loop { fuse: Some(fuse), .. } => fuse.image_path().parent().map(Path::to_path_buf),
            _ => None,
        }
    }

    /// For the FUSE+loop backend served by this process: whether the kernel sends its requests
    /// over io_uring queues (`Some(true)`) or `/dev/fuse` (`Some(false)`).
    pub fn fuse_io_uring(&self) -> Option<bool> {
        match &self.device {
            Device::Loop { fuse: Some(fuse), .. } => Some(fuse.uses_io_uring()),
            _ => None,
        }
    }

    /// Whether reads bypass this process (a loop device on the complete cache file).
    pub fn is_direct(&self) -> bool {
        matches!(self.device, Device::Loop { fuse: None, .. })
    }

    /// Unmounts the filesystem, then removes the device and stops serving it. If the filesystem
    /// is busy nothing is torn down and the error says so.
    pub async fn detach(self) -> Result<(), AttachError> {
        let mp = self.mountpoint.clone();
        blocking(move || unmount(&mp)).await?;
        match self.device {
            Device::Ublk(dev) => blocking(move || dev.delete()).await,
            Device::Loop { dev, fuse } => {
                blocking(move || dev.detach()).await?;
                if let Some(fuse) = fuse {
                    fuse.stop();
                }
                Ok(())
            }
        }
    }
}

/// Attaches `file` to a loop device with `attach` and mounts it. The device is held until the
/// mount has it, so a failed mount (or a kill before it) leaves no loop device behind.
fn loop_and_mount(
    attach: fn(&Path) -> Result<loopdev::LoopClaim, AttachError>,
    file: &Path,
    mountpoint: &Path,
    fs: FsType,
    writable: bool,
) -> Result<LoopDevice, AttachError> {
    let claim = attach(file)?;
    mount_device(claim.device().path(), mountpoint, fs, writable)?;
    Ok(claim.release())
}

/// Runs blocking device and mount work off the runtime threads (which may be serving the very
/// device being mounted).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, AttachError> + Send + 'static) -> Result<T, AttachError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| AttachError::new(AttachErrorKind::Io, format!("device task failed: {e}")))?
}
