//! Local sources: a regular file, or a block device read with direct I/O (a slow disk, a SAN
//! LUN or a network block device, cached on fast local disk as ULOOP's `ulobdev` did). Each
//! holds the descriptor it was opened with, so a path swapped after an allowlist check changes
//! nothing, and checks before and after every read that what it reads is still the version it
//! probed: a file by size, inode and mtime, a device by size and device number.

use super::{ImageInfo, RangeSource};
use crate::error::{Error, ErrorKind, Result};
use async_trait::async_trait;
use bytes::Bytes;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// Direct reads are aligned to this (a multiple of every logical block size in use).
const DIRECT_ALIGN: usize = 4096;

fn open_error(what: &str, e: std::io::Error) -> Error {
    let kind = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        _ => ErrorKind::InvalidInput,
    };
    Error::with_source(kind, what.to_string(), e)
}

/// Opens `path` (symlinks followed: the CLI's user means what the path names) as a file or block
/// device source, whichever it is.
pub fn open_local(path: &Path) -> Result<Arc<dyn RangeSource>> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|e| open_error(&format!("image {name}"), e))?;
    local_source(file, name)
}

/// A source over an already opened file or block device (a device is reopened with `O_DIRECT`
/// through its descriptor, never through its path).
pub fn local_source(file: File, name: String) -> Result<Arc<dyn RangeSource>> {
    let md = file.metadata().map_err(|e| open_error(&name, e))?;
    if md.file_type().is_block_device() {
        Ok(Arc::new(DeviceSource::from_file(&file, name)?))
    } else {
        Ok(Arc::new(FileSource::from_file(file, name)?))
    }
}

pub struct FileSource {
    file: Arc<File>,
    name: String,
}

impl FileSource {
    /// Opens the regular file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let file = File::open(path).map_err(|e| open_error(&format!("image file {name}"), e))?;
        Self::from_file(file, name)
    }

    /// A source over `file`, opened by the caller; `name` is what logs and errors call it.
    pub fn from_file(file: File, name: String) -> Result<Self> {
        let s = FileSource { file: Arc::new(file), name };
        s.info()?;
        Ok(s)
    }

    fn info(&self) -> Result<ImageInfo> {
        let md = self.file.metadata().map_err(|e| Error::with_source(ErrorKind::Transport, format!("image file {}", self.name), e))?;
        if !md.is_file() {
            return Err(Error::new(ErrorKind::InvalidInput, format!("{} is not a regular file", self.name)));
        }
        Ok(ImageInfo { size: md.len(), etag: Some(format!("{:x}-{:x}-{:x}", md.ino(), md.mtime(), md.mtime_nsec())), last_modified: None })
    }
}

#[async_trait]
impl RangeSource for FileSource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn probe(&self) -> Result<ImageInfo> {
        self.info()
    }

    async fn fetch(&self, offset: u64, len: u64, expect: &ImageInfo) -> Result<Bytes> {
        let (file, name) = (self.file.clone(), self.name.clone());
        read_unchanged(
            &self.name,
            || self.info(),
            expect,
            move || {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| Error::with_source(ErrorKind::Protocol, format!("{name} at offset {offset} length {len}"), e))?;
                Ok(Bytes::from(buf))
            },
        )
        .await
    }
}

/// A block device, read with `O_DIRECT` so the page cache does not hold a slow device's bytes
/// beside the cache's copy of them.
pub struct DeviceSource {
    file: Arc<File>,
    name: String,
}

impl DeviceSource {
    /// Reopens `dev` (a block device) read-only with `O_DIRECT` through its descriptor.
    pub fn from_file(dev: &File, name: String) -> Result<Self> {
        let reopened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/proc/self/fd/{}", dev.as_raw_fd()))
            .map_err(|e| Error::with_source(ErrorKind::InvalidInput, format!("device {name}: opening it for direct reads"), e))?;
        let s = DeviceSource { file: Arc::new(reopened), name };
        s.info()?;
        Ok(s)
    }

    fn info(&self) -> Result<ImageInfo> {
        let md = self.file.metadata().map_err(|e| Error::with_source(ErrorKind::Transport, format!("device {}", self.name), e))?;
        if !md.file_type().is_block_device() {
            return Err(Error::new(ErrorKind::InvalidInput, format!("{} is not a block device", self.name)));
        }
        // A block device's end is its size (pread does not use the position this moves).
        let size = std::io::Seek::seek(&mut &*self.file, std::io::SeekFrom::End(0))
            .map_err(|e| Error::with_source(ErrorKind::Transport, format!("device {}: reading its size", self.name), e))?;
        Ok(ImageInfo { size, etag: Some(format!("dev-{:x}-{size:x}", md.rdev())), last_modified: None })
    }
}

#[async_trait]
impl RangeSource for DeviceSource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn probe(&self) -> Result<ImageInfo> {
        self.info()
    }

    async fn fetch(&self, offset: u64, len: u64, expect: &ImageInfo) -> Result<Bytes> {
        let end = offset.checked_add(len).filter(|&e| e <= expect.size);
        let Some(end) = end else {
            return Err(Error::new(ErrorKind::InvalidInput, format!("{}: {len} bytes at {offset} pass its end", self.name)));
        };
        let (file, name) = (self.file.clone(), self.name.clone());
        read_unchanged(
            &self.name,
            || self.info(),
            expect,
            move || {
                let align = DIRECT_ALIGN as u64;
                let start = offset / align * align;
                let stop = end.div_ceil(align) * align;
                let want = (stop - start) as usize;
                // An aligned region inside a plain buffer, with no unsafe allocation.
                let mut raw = vec![0u8; want + DIRECT_ALIGN];
                let skip = raw.as_ptr().align_offset(DIRECT_ALIGN);
                let buf = &mut raw[skip..skip + want];
                let mut got = 0usize;
                while got < want {
                    match file.read_at(&mut buf[got..], start + got as u64) {
                        Ok(0) => break, // the device ends inside the last aligned block
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(Error::with_source(ErrorKind::Transport, format!("{name} at offset {start} length {want}"), e))
                        }
                    }
                }
                let (from, to) = ((offset - start) as usize, (end - start) as usize);
                if got < to {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        format!("{name}: ended at {} reading {len} bytes at {offset}", start + got as u64),
                    ));
                }
                Ok(Bytes::copy_from_slice(&buf[from..to]))
            },
        )
        .await
    }
}

/// Runs `read` on a blocking thread between two checks that the source is still the version
/// `expect` describes: bytes read while it was written may mix two versions.
async fn read_unchanged(
    name: &str,
    info: impl Fn() -> Result<ImageInfo>,
    expect: &ImageInfo,
    read: impl FnOnce() -> Result<Bytes> + Send + 'static,
) -> Result<Bytes> {
    expect.check_same(&info()?, name)?;
    let data = tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| Error::with_source(ErrorKind::Transport, format!("{name}: read task"), e))??;
    expect.check_same(&info()?, name)?;
    Ok(data)
}
