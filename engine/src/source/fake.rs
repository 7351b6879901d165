//! In-memory source with fault injection and counters, for tests of everything above it.

use super::{ImageInfo, RangeSink, RangeSource};
use crate::error::{Error, ErrorKind, Result};
use crate::lock;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A fault the next matching fetches will suffer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The next `times` fetches touching byte `offset` fail with this kind.
    FailAt { offset: u64, times: u32, kind: ErrorKind },
    /// The next `times` fetches touching byte `offset` return that byte flipped.
    CorruptAt { offset: u64, times: u32 },
    /// Every fetch waits this long first.
    Delay(Duration),
    /// Every fetch hands its bytes over `piece` bytes at a time, waiting `pause` before each
    /// (a body arriving over a slow link).
    Trickle { piece: usize, pause: Duration },
}

pub struct FakeSource {
    data: Mutex<Bytes>,
    etag: Mutex<String>,
    faults: Mutex<Vec<Fault>>,
    pub fetches: AtomicU64,
    pub bytes_served: AtomicU64,
    /// Fetches running now, and the most that ever ran at once.
    running: AtomicU64,
    most_at_once: AtomicU64,
}

impl FakeSource {
    pub fn new(data: impl Into<Bytes>) -> Self {
        FakeSource {
            data: Mutex::new(data.into()),
            etag: Mutex::new("\"v1\"".into()),
            faults: Mutex::new(Vec::new()),
            fetches: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            running: AtomicU64::new(0),
            most_at_once: AtomicU64::new(0),
        }
    }

    pub fn inject(&self, fault: Fault) {
        lock(&self.faults).push(fault);
    }

    /// Replaces the image and its ETag, as an origin that publishes a new version would.
    pub fn replace(&self, data: impl Into<Bytes>, etag: &str) {
        *lock(&self.data) = data.into();
        *lock(&self.etag) = etag.into();
    }

    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    pub fn bytes_count(&self) -> u64 {
        self.bytes_served.load(Ordering::Relaxed)
    }

    /// The most fetches that ever ran at the same time.
    pub fn most_at_once(&self) -> u64 {
        self.most_at_once.load(Ordering::SeqCst)
    }

    fn info(&self) -> ImageInfo {
        ImageInfo { size: lock(&self.data).len() as u64, etag: Some(lock(&self.etag).clone()), last_modified: None }
    }
}

/// Counts a fetch out of `running` however it ends.
struct Running<'a>(&'a AtomicU64);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl RangeSource for FakeSource {
    fn describe(&self) -> String {
        "fake://image".into()
    }

    async fn probe(&self) -> Result<ImageInfo> {
        Ok(self.info())
    }

    async fn fetch(&self, offset: u64, len: u64, expect: &ImageInfo) -> Result<Bytes> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        let _running = Running(&self.running);
        let end = offset + len;
        let mut delay = None;
        let mut fail = None;
        let mut corrupt = None;
        {
            let mut faults = lock(&self.faults);
            for f in faults.iter_mut() {
                match f {
                    Fault::Delay(d) => delay = Some(*d),
                    Fault::FailAt { offset: at, times, kind } if *times > 0 && (offset..end).contains(at) => {
                        *times -= 1;
                        fail = Some(*kind);
                        break;
                    }
                    Fault::CorruptAt { offset: at, times } if *times > 0 && (offset..end).contains(at) => {
                        *times -= 1;
                        corrupt = Some(*at - offset);
                        break;
                    }
                    _ => {}
                }
            }
        }
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if let Some(kind) = fail {
            return Err(Error::new(kind, format!("injected fault at offset {offset}")));
        }
        expect.check_same(&self.info(), "fake://image")?;
        let data = lock(&self.data).clone();
        if end > data.len() as u64 {
            return Err(Error::new(ErrorKind::InvalidInput, "range past the end"));
        }
        self.bytes_served.fetch_add(len, Ordering::Relaxed);
        let out = data.slice(offset as usize..end as usize);
        if let Some(at) = corrupt {
            let mut v = out.to_vec();
            if let Some(b) = v.get_mut(at as usize) {
                *b ^= 0xff;
            }
            return Ok(Bytes::from(v));
        }
        Ok(out)
    }

    async fn fetch_to(&self, offset: u64, len: u64, expect: &ImageInfo, sink: &dyn RangeSink) -> Result<()> {
        let trickle = lock(&self.faults).iter().find_map(|f| match f {
            Fault::Trickle { piece, pause } => Some((*piece, *pause)),
            _ => None,
        });
        let data = self.fetch(offset, len, expect).await?;
        let (piece, pause) = trickle.unwrap_or((data.len().max(1), Duration::ZERO));
        for part in data.chunks(piece.max(1)) {
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            if !sink.push(part) {
                return Err(Error::new(ErrorKind::Protocol, "fake://image: more bytes than asked"));
            }
        }
        Ok(())
    }
}
