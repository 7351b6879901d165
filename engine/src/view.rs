//! The block device view: all a block backend (ublk, FUSE+loop) needs of what serves a device's
//! bytes. A flat image (`LazyImage`) is one; a stack of layers, each the lazy cache of its own
//! blob, will be another. Backends hold a `View` and never see what is behind it.

use crate::error::Result;
use crate::image::{Condition, LazyImage, ReadPlan};
use crate::stats::StatsSnapshot;
use async_trait::async_trait;
use bytes::Bytes;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

/// What backends hold: cheap to clone, shared by every queue and session thread.
pub type View = Arc<dyn BlockView>;

#[async_trait]
pub trait BlockView: Send + Sync + 'static {
    /// Bytes the device shows.
    fn size(&self) -> u64;

    /// The unit the view fetches in: backends align their devices' read-ahead to it.
    fn chunk_size(&self) -> u64;

    /// How to serve `buf.len()` bytes at `offset` without waiting (see `ReadPlan`). Callable
    /// from any thread; a hit counts as a read.
    fn plan_read(&self, offset: u64, buf: &mut [u8]) -> ReadPlan<'_>;

    /// `plan_read` with the cache file read on the caller's thread: `None` on a miss.
    fn read_cached_into(&self, offset: u64, buf: &mut [u8]) -> Result<Option<usize>>;

    /// A direct descriptor offered by a plan failed with EINVAL: offer none from now on.
    fn direct_refused(&self);

    /// `buf.len()` bytes at `offset` (fewer at the end), waiting for what is not cached.
    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize>;

    /// As `read_into`, into new memory.
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes>;

    /// Healthy, or why not.
    fn condition(&self) -> Condition;

    fn stats(&self) -> StatsSnapshot;

    /// Waits for the fetches in flight and persists what every blob of the view has cached (at
    /// unmount): the next open finds it.
    async fn close(&self) -> Result<()>;

    /// A local file holding every byte of the device at the same offsets, never written again,
    /// once there is one (a flat image complete in its cache): a loop device can then read it
    /// with no server in between.
    fn complete_file(&self) -> Option<PathBuf> {
        None
    }

    /// Whether the device may be written (a writable layer over an image); every other view is
    /// read-only and its write calls fail with `ReadOnly`.
    fn writable(&self) -> bool {
        false
    }

    /// `write` done on the caller's thread when it needs no wait (no block to copy from below
    /// first): `None` means call `write`.
    fn write_now(&self, _offset: u64, _src: &[u8]) -> Option<Result<()>> {
        Some(Err(read_only()))
    }

    async fn write(&self, _offset: u64, _src: &[u8]) -> Result<()> {
        Err(read_only())
    }

    /// Where a block device's driver may copy the `len` bytes of a write at `offset` itself,
    /// straight into the view's store (the mapped data file of a writable layer, for blocks it
    /// already holds): no copy through the backend's buffer and no system call to store it.
    /// `placed` ends such a write. `None`: the write goes through `write_now` or `write`.
    fn write_place(&self, _offset: u64, _len: usize) -> Option<NonNull<u8>> {
        None
    }

    /// Ends a write of `len` bytes at `offset` that the driver copied to `write_place`.
    fn placed(&self, _offset: u64, _len: usize) -> Result<()> {
        Err(read_only())
    }

    /// Makes `len` bytes at `offset` read as zeros, freeing what held them (discard and
    /// write-zeroes both come here).
    async fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }

    /// Makes every acknowledged write durable.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

fn read_only() -> crate::Error {
    crate::Error::new(crate::ErrorKind::ReadOnly, "this device is read-only")
}

#[async_trait]
impl BlockView for LazyImage {
    fn size(&self) -> u64 {
        LazyImage::size(self)
    }

    fn chunk_size(&self) -> u64 {
        LazyImage::chunk_size(self)
    }

    fn plan_read(&self, offset: u64, buf: &mut [u8]) -> ReadPlan<'_> {
        LazyImage::plan_read(self, offset, buf)
    }

    fn read_cached_into(&self, offset: u64, buf: &mut [u8]) -> Result<Option<usize>> {
        LazyImage::read_cached_into(self, offset, buf)
    }

    fn direct_refused(&self) {
        LazyImage::direct_refused(self)
    }

    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        LazyImage::read_into(self, offset, buf).await
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        LazyImage::read(self, offset, len).await
    }

    fn condition(&self) -> Condition {
        LazyImage::condition(self)
    }

    fn stats(&self) -> StatsSnapshot {
        LazyImage::stats(self)
    }

    async fn close(&self) -> Result<()> {
        self.clone().close().await
    }

    fn complete_file(&self) -> Option<PathBuf> {
        self.complete_data_file()
    }
}

impl LazyImage {
    /// This image as a block device view, for a backend.
    pub fn view(&self) -> View {
        Arc::new(self.clone())
    }
}
