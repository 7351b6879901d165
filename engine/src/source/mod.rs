//! Range sources: where image bytes come from. Each source answers `probe` (size + validator) and
//! `fetch` (exact bytes of a range, refused if the origin no longer matches the probed validator).
//! Sources wrap each other: `Retrying` adds the retry policy around any source; `FakeSource`
//! (in-memory, fault-injecting) ships with the code for tests.

mod fake;
mod file;
mod http;
mod http1;
mod retry;

pub use fake::{FakeSource, Fault};
pub use file::{local_source, open_local, DeviceSource, FileSource};
pub use http::{HttpSource, HttpSourceOptions};
pub use retry::{RetryPolicy, Retrying};

use crate::error::{Error, ErrorKind, Result};
use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// What a probe learns about an image; the validator fields pin the version we serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub size: u64,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

impl ImageInfo {
    /// True when the origin gives us something to detect a change with besides the size.
    pub fn has_validator(&self) -> bool {
        self.etag.is_some() || self.last_modified.is_some()
    }

    /// Fails with `OriginChanged` unless `seen` describes the same image version as `self`.
    pub fn check_same(&self, seen: &ImageInfo, what: &str) -> Result<()> {
        let changed = |field: &str, a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| {
            Err(Error::new(ErrorKind::OriginChanged, format!("{what}: {field} was {a:?} at probe, now {b:?}")))
        };
        if self.size != seen.size {
            return changed("size", &self.size, &seen.size);
        }
        // A validator that disappears or appears also counts as a change: we cannot prove sameness.
        if self.etag != seen.etag {
            return changed("ETag", &self.etag, &seen.etag);
        }
        if self.etag.is_none() && self.last_modified != seen.last_modified {
            return changed("Last-Modified", &self.last_modified, &seen.last_modified);
        }
        Ok(())
    }
}

#[async_trait]
pub trait RangeSource: Send + Sync + 'static {
    /// A short name for logs and errors (URL without query, or a path).
    fn describe(&self) -> String;

    /// Learns size and validator. Done once per attach.
    async fn probe(&self) -> Result<ImageInfo>;

    /// Returns exactly `len` bytes at `offset`, or an error. Implementations must refuse (with
    /// `OriginChanged`) an answer whose validator or total size differs from `expect`.
    async fn fetch(&self, offset: u64, len: u64, expect: &ImageInfo) -> Result<Bytes>;

    /// As `fetch`, but hands the bytes to `sink` in order as they arrive, so that readers can
    /// use the front of a large range before its end is in. On an error `sink` may hold a
    /// prefix of the range, never a byte past it or from another version of the image. This
    /// default hands over the whole range at once.
    async fn fetch_to(&self, offset: u64, len: u64, expect: &ImageInfo, sink: &dyn RangeSink) -> Result<()> {
        let data = self.fetch(offset, len, expect).await?;
        if !sink.push(&data) {
            return Err(Error::new(ErrorKind::Protocol, format!("{}: {len} bytes at {offset} do not fit where they go", self.describe())));
        }
        Ok(())
    }
}

/// Where `fetch_to` puts the bytes of a range, in order.
pub trait RangeSink: Send + Sync {
    /// Bytes taken so far.
    fn received(&self) -> u64;
    /// Appends `bytes`; false (nothing taken) if they do not fit.
    fn push(&self, bytes: &[u8]) -> bool;
    /// Appends in place what `read` writes into the room it is handed (at most `max` bytes),
    /// so that a socket reads straight into the sink without a buffer of its own in between.
    /// None (nothing taken, `read` not called) if `max` more bytes do not fit; else what
    /// `read` returned, with the count of bytes it appended.
    fn push_from(&self, max: usize, read: &mut dyn FnMut(&mut dyn BufMut) -> std::io::Result<()>) -> Option<std::io::Result<usize>>;
}

/// A sink that collects one range in memory, for sources' `fetch` (the read path has its own
/// sink, which readers wait on as it fills).
pub struct RangeBuf {
    buf: std::sync::Mutex<BytesMut>,
    cap: usize,
}

impl RangeBuf {
    /// Room for exactly `len` bytes.
    pub fn new(len: usize) -> Self {
        RangeBuf { buf: std::sync::Mutex::new(BytesMut::with_capacity(len)), cap: len }
    }

    /// What was taken so far (the sink is empty afterwards).
    pub fn take(&self) -> Bytes {
        std::mem::take(&mut *self.lock()).freeze()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RangeSink for RangeBuf {
    fn received(&self) -> u64 {
        self.lock().len() as u64
    }

    fn push(&self, bytes: &[u8]) -> bool {
        let mut buf = self.lock();
        if buf.len() + bytes.len() > self.cap {
            return false;
        }
        buf.extend_from_slice(bytes);
        true
    }

    fn push_from(&self, max: usize, read: &mut dyn FnMut(&mut dyn BufMut) -> std::io::Result<()>) -> Option<std::io::Result<usize>> {
        let mut buf = self.lock();
        if buf.len() + max > self.cap {
            return None;
        }
        let before = buf.len();
        let res = read(&mut (&mut *buf).limit(max));
        Some(res.map(|()| buf.len() - before))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_buf_takes_exactly_its_length() {
        let b = RangeBuf::new(10);
        assert!(b.push(b"abcd"));
        assert!(!b.push(b"0123456789"), "past the end: nothing taken");
        assert!(b.push_from(7, &mut |_| Ok(())).is_none(), "no room for 7 more");
        let n = b.push_from(6, &mut |dst| {
            dst.put_slice(b"efghij");
            Ok(())
        });
        assert_eq!(n.map(|r| r.ok()), Some(Some(6)));
        assert_eq!(b.received(), 10);
        assert_eq!(&b.take()[..], b"abcdefghij");
    }
}
