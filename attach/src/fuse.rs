//! A FUSE filesystem with a single read-only file whose bytes are the image. Misses and large reads are handed to
//! the engine's tokio runtime and answered when the data is there, so the FUSE thread never
//! waits on the network and many reads are in flight at once.

use crate::{AttachError, AttachErrorKind};
use fuser::{FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, Request};
use lazy_image_engine::LazyImage;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::runtime::Handle;

pub const IMAGE_FILE_NAME: &str = "image";
const ROOT: u64 = 1;
const FILE: u64 = 2;
/// Attributes never change while mounted: let the kernel cache them.
const TTL: Duration = Duration::from_secs(3600);
/// FOPEN_KEEP_CACHE: the file's content is immutable, keep page cache across opens.
const FOPEN_KEEP_CACHE: u32 = 1 << 1;
/// Reads up to this size that hit the cache are served on the session thread (see `read`).
const SYNC_HIT_MAX: usize = 64 << 10;

struct ImageFs {
    image: LazyImage,
    rt: Handle,
    started: SystemTime,
}

impl ImageFs {
    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o555, 0, 2)
        } else {
            (FileType::RegularFile, 0o444, self.image.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        // The loop device reads this file with direct I/O. Without async DIO the kernel sends its
        // requests one at a time and the loop worker sleeps through each; with it, they are all in
        // flight at once and complete from our reply.
        if let Err(missing) = config.add_capabilities(fuser::consts::FUSE_ASYNC_DIO) {
            tracing::debug!(missing, "kernel offers no async direct I/O for FUSE");
        }
        // Larger requests mean fewer round trips through the kernel for sequential reads.
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == IMAGE_FILE_NAME {
            reply.entry(&TTL, &self.attr(FILE), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT | FILE => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if ino != FILE {
            reply.error(libc::EISDIR);
        } else if flags & libc::O_ACCMODE != libc::O_RDONLY {
            reply.error(libc::EROFS);
        } else {
            reply.opened(0, FOPEN_KEEP_CACHE);
        }
    }

    fn read(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, size: u32, _flags: i32, _lock: Option<u64>, reply: ReplyData) {
        if ino != FILE || offset < 0 {
            reply.error(libc::EINVAL);
            return;
        }
        // A small read whose chunks are all cached is answered here, on fuser's session thread:
        // a hop to the runtime costs a thread wakeup, a large share of a warm 4 KiB read (paired
        // with a plain loop device, warm random 0.65-0.70x -> 0.78-0.83x). Larger reads (the
        // loop device's readahead, up to 1 MiB) still go to the runtime: served here one at a
        // time they starved sequential reads of parallel disk reads.
        if (size as usize) <= SYNC_HIT_MAX {
            let mut buf = vec![0u8; size as usize];
            match self.image.read_cached_into(offset as u64, &mut buf) {
                Ok(Some(n)) => return reply.data(&buf[..n]),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(offset, size, error = %e.report(), "cache read failed");
                    return reply.error(e.kind().errno());
                }
            }
        }
        let image = self.image.clone();
        self.rt.spawn(async move {
            match image.read(offset as u64, size as u64).await {
                Ok(bytes) => reply.data(&bytes),
                Err(e) => {
                    tracing::warn!(offset, size, error = %e.report(), "image read failed");
                    reply.error(e.kind().errno());
                }
            }
        });
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            reply.error(libc::ENOTDIR);
            return;
        }
        let entries = [(ROOT, FileType::Directory, "."), (ROOT, FileType::Directory, ".."), (FILE, FileType::RegularFile, IMAGE_FILE_NAME)];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A running FUSE export of one image. `stop` unmounts it.
pub struct FuseExport {
    dir: PathBuf,
    session: fuser::BackgroundSession,
}

impl FuseExport {
    pub fn start(image: LazyImage, dir: &Path, rt: Handle) -> Result<Self, AttachError> {
        std::fs::create_dir_all(dir).map_err(|e| AttachError::os(format!("creating {}", dir.display()), e))?;
        if crate::is_mountpoint(dir)? {
            // Left behind by a process that died: it cannot be serving anyone now.
            crate::unmount(dir)?;
        }
        let fs = ImageFs { image, rt, started: SystemTime::now() };
        let opts = [MountOption::RO, MountOption::FSName("lazy-image".into()), MountOption::Subtype("lazy-image".into())];
        let session = fuser::spawn_mount2(fs, dir, &opts).map_err(|e| {
            let mut err = AttachError::os(format!("mounting FUSE at {} (is /dev/fuse available?)", dir.display()), e);
            err.kind = AttachErrorKind::Unsupported;
            err
        })?;
        Ok(FuseExport { dir: dir.to_path_buf(), session })
    }

    pub fn image_path(&self) -> PathBuf {
        self.dir.join(IMAGE_FILE_NAME)
    }

    pub fn stop(self) {
        drop(self.session);
    }
}
