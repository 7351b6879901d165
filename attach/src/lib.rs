//! Turns a `LazyImage` into a mounted read-only filesystem without ublk: the image is exposed as
//! one read-only file on a private FUSE mount, that file is attached read-only to a loop device,
//! and the loop device is mounted read-only. Teardown runs in reverse: filesystem, loop, FUSE.
//! The ublk backend (block device served directly) will sit beside this one.

mod error;
mod fsdetect;
mod fuse;
mod loopdev;
mod mount;

pub use error::{AttachError, AttachErrorKind};
pub use fsdetect::{detect, FsType};
pub use fuse::{FuseExport, IMAGE_FILE_NAME};
pub use loopdev::LoopDevice;
pub use mount::{is_mountpoint, mount_readonly, unmount};

use lazy_image_engine::LazyImage;
use std::path::{Path, PathBuf};

/// A mounted image. `detach` tears it down; dropping it without `detach` leaves it mounted on
/// purpose (a daemon that restarts must not pull the floor from under readers).
pub struct Attachment {
    pub mountpoint: PathBuf,
    pub fs: FsType,
    pub loop_dev: LoopDevice,
    fuse: FuseExport,
}

impl Attachment {
    /// Exposes `image` through FUSE in `work_dir`, attaches it to a loop device and mounts the
    /// filesystem read-only at `mountpoint`. On failure everything done so far is undone.
    pub async fn attach(
        image: LazyImage,
        work_dir: &Path,
        mountpoint: &Path,
        fs: Option<FsType>,
    ) -> Result<Self, AttachError> {
        let fs = match fs {
            Some(f) => f,
            None => detect(&image).await?,
        };
        if !mountpoint.is_dir() {
            return Err(AttachError::new(AttachErrorKind::InvalidInput, format!("mount point {} is not a directory", mountpoint.display())));
        }
        if is_mountpoint(mountpoint)? {
            return Err(AttachError::new(AttachErrorKind::Busy, format!("{} is already a mount point", mountpoint.display())));
        }
        let fuse = FuseExport::start(image, &work_dir.join("fuse"), tokio::runtime::Handle::current())?;
        let mp = mountpoint.to_path_buf();
        let file = fuse.image_path();
        // Loop setup and mount block on the FUSE file, which this process serves: keep them off
        // the runtime threads that answer FUSE reads.
        let res = tokio::task::spawn_blocking(move || -> Result<LoopDevice, AttachError> {
            let dev = LoopDevice::attach_readonly(&file)?;
            if let Err(e) = mount_readonly(dev.path(), &mp, fs) {
                let _ = dev.detach();
                return Err(e);
            }
            Ok(dev)
        })
        .await
        .map_err(|e| AttachError::new(AttachErrorKind::Io, format!("attach task failed: {e}")))?;
        match res {
            Ok(loop_dev) => Ok(Attachment { mountpoint: mountpoint.to_path_buf(), fs, loop_dev, fuse }),
            Err(e) => {
                fuse.stop();
                Err(e)
            }
        }
    }

    /// Unmounts the filesystem, detaches the loop device and stops the FUSE export, in that order.
    /// If the filesystem is busy nothing is torn down and the error says so.
    pub async fn detach(self) -> Result<(), AttachError> {
        let mp = self.mountpoint.clone();
        let dev = self.loop_dev.clone();
        tokio::task::spawn_blocking(move || -> Result<(), AttachError> {
            unmount(&mp)?;
            dev.detach()
        })
        .await
        .map_err(|e| AttachError::new(AttachErrorKind::Io, format!("detach task failed: {e}")))??;
        self.fuse.stop();
        Ok(())
    }
}
