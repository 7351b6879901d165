//! A run's buffer while its bytes arrive: one fetch appends to it in order, and readers copy any
//! part that has arrived without waiting for the rest: a reader of the first MiB of an 8 MiB
//! read-ahead request otherwise waits for all eight.
//!
//! For a verified image each chunk is checked against the manifest as soon as it is whole, and
//! readers see only the checked chunks before the first bad one.

use crate::cache::PooledBuf;
use crate::lock;
use crate::manifest::Manifest;
use crate::source::RangeSink;
use bytes::{BufMut, Bytes};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Checks whole chunks of a run against the manifest as they arrive.
pub(crate) struct ChunkCheck {
    pub manifest: Arc<Manifest>,
    /// The run's first chunk, and the chunk size.
    pub first: u64,
    pub chunk_size: usize,
}

/// What the writer keeps under its lock.
struct Writer {
    /// Taken at the first byte, so that runs waiting for a fetch slot hold no buffer.
    buf: Option<PooledBuf>,
    /// Bytes whose chunks were checked (with a check).
    checked: usize,
    /// Chunks that did not match the manifest.
    bad: Vec<u64>,
}

pub(crate) struct Filling {
    /// Appended to under the lock; readers go through `base`, only below `readable`.
    writer: Mutex<Writer>,
    /// The buffer's start, set before the first byte is published.
    base: AtomicPtr<u8>,
    len: usize,
    check: Option<ChunkCheck>,
    /// Bytes appended so far. Never goes back, and no byte below it is written again.
    filled: AtomicUsize,
    /// What readers may take: all of `filled`, or with a check the chunks checked good before
    /// the first bad one. Never goes back.
    readable: AtomicUsize,
    /// The fetch ended (whole, or failed): waiting is over either way.
    closed: AtomicBool,
    /// Readers waiting for `readable` to reach a position, and the smallest such position.
    waiters: Mutex<Vec<(usize, oneshot::Sender<()>)>>,
    min_need: AtomicUsize,
}

impl Filling {
    pub(crate) fn new(len: usize, check: Option<ChunkCheck>) -> Arc<Self> {
        Arc::new(Filling {
            writer: Mutex::new(Writer { buf: None, checked: 0, bad: Vec::new() }),
            base: AtomicPtr::new(std::ptr::null_mut()),
            len,
            check,
            filled: AtomicUsize::new(0),
            readable: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
            min_need: AtomicUsize::new(usize::MAX),
        })
    }

    /// The length of the range being fetched.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first `n` bytes, `n` at most `filled` (as loaded by the caller, with acquire).
    fn prefix(&self, n: usize) -> &[u8] {
        if n == 0 {
            return &[];
        }
        let base = self.base.load(Ordering::Acquire);
        // SAFETY: `base` was set before any byte was published, and points into the writer's
        // buffer, which lives as long as `self` and never moves. Bytes below `filled` were
        // written before `filled` was published (release) and are never written again: the only
        // writer (`append`, under the lock: `push` and `push_from`) writes past them.
        unsafe { std::slice::from_raw_parts(base, n) }
    }

    /// The bytes that arrived, `[0, filled)`.
    fn arrived(&self) -> &[u8] {
        self.prefix(self.filled.load(Ordering::Acquire))
    }

    /// Everything that arrived as `Bytes` without a copy, keeping the buffer alive.
    pub(crate) fn bytes(self: &Arc<Self>) -> Bytes {
        Bytes::from_owner(Arrived(self.clone()))
    }

    /// The chunks that failed their check, once the fetch has ended.
    pub(crate) fn bad_chunks(&self) -> Vec<u64> {
        lock(&self.writer).bad.clone()
    }

    /// Waits until `[0, end)` may be read; false if the fetch ended without that (it failed,
    /// or a chunk before `end` did not match the manifest).
    pub(crate) async fn wait_for(&self, end: usize) -> bool {
        if self.readable.load(Ordering::Acquire) >= end {
            return true;
        }
        let rx = {
            let mut w = lock(&self.waiters);
            let (tx, rx) = oneshot::channel();
            w.push((end, tx));
            self.min_need.fetch_min(end, Ordering::SeqCst);
            rx
        };
        // Checked after registering (both sides SeqCst): a `push` that stored `readable` before
        // our `min_need` is seen here; one after it sees `min_need` and wakes us.
        if self.readable.load(Ordering::SeqCst) >= end {
            return true;
        }
        if self.closed.load(Ordering::SeqCst) {
            return self.readable.load(Ordering::Acquire) >= end;
        }
        let _ = rx.await;
        self.readable.load(Ordering::Acquire) >= end
    }

    /// Copies `[at, at + out.len())` of the readable bytes; the caller waited for them.
    pub(crate) fn copy_to(&self, at: usize, out: &mut [u8]) -> bool {
        // `readable` never passes `filled`.
        match self.prefix(self.readable.load(Ordering::Acquire)).get(at..at + out.len()) {
            Some(src) => {
                out.copy_from_slice(src);
                true
            }
            None => false,
        }
    }

    /// The fetch ended, whole or not: wakes every reader.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.wake(usize::MAX);
    }

    /// Wakes the readers waiting for positions up to `upto`.
    fn wake(&self, upto: usize) {
        if self.min_need.load(Ordering::SeqCst) > upto {
            return;
        }
        let mut w = lock(&self.waiters);
        let mut min = usize::MAX;
        for (need, tx) in std::mem::take(&mut *w) {
            if need <= upto {
                let _ = tx.send(());
            } else {
                min = min.min(need);
                w.push((need, tx));
            }
        }
        self.min_need.store(min, Ordering::SeqCst);
    }

    /// Runs `append` on the writer's buffer (taken now if this is the first byte), then
    /// publishes what it appended and wakes the readers it concerns. None if `append` said the
    /// bytes do not fit.
    fn append<T>(&self, append: impl FnOnce(&mut PooledBuf) -> Option<T>) -> Option<T> {
        let (out, readable) = {
            let mut guard = lock(&self.writer);
            let w = &mut *guard;
            let buf = w.buf.get_or_insert_with(|| {
                let b = PooledBuf::with_capacity(self.len);
                self.base.store(b.as_ptr().cast_mut(), Ordering::Release);
                b
            });
            let before = buf.len();
            let out = append(buf)?;
            let filled = buf.len();
            if filled == before {
                return Some(out);
            }
            self.filled.store(filled, Ordering::SeqCst);
            if let Some(check) = &self.check {
                // Every chunk now whole (the last may be short: the image's end).
                while w.checked < filled && (filled - w.checked >= check.chunk_size || filled == self.len) {
                    let (a, b) = (w.checked, (w.checked + check.chunk_size).min(filled));
                    let index = check.first + (a / check.chunk_size) as u64;
                    if !check.manifest.verify(index, &buf.as_ref()[a..b]) {
                        w.bad.push(index);
                    } else if w.bad.is_empty() {
                        self.readable.store(b, Ordering::SeqCst);
                    }
                    w.checked = b;
                }
            } else {
                self.readable.store(filled, Ordering::SeqCst);
            }
            (out, self.readable.load(Ordering::SeqCst))
        };
        self.wake(readable);
        Some(out)
    }
}

impl RangeSink for Filling {
    fn received(&self) -> u64 {
        self.filled.load(Ordering::Acquire) as u64
    }

    fn push(&self, bytes: &[u8]) -> bool {
        self.append(|buf| (buf.len() + bytes.len() <= self.len && buf.extend_from_slice(bytes)).then_some(())).is_some()
    }

    fn push_from(&self, max: usize, read: &mut dyn FnMut(&mut dyn BufMut) -> io::Result<()>) -> Option<io::Result<usize>> {
        self.append(|buf| {
            if buf.len() + max > self.len {
                return None;
            }
            let before = buf.len();
            let res = read(&mut buf.spare(max));
            Some(res.map(|()| buf.len() - before))
        })
    }
}

struct Arrived(Arc<Filling>);

impl AsRef<[u8]> for Arrived {
    fn as_ref(&self) -> &[u8] {
        self.0.arrived()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn readers_get_what_arrived_without_waiting_for_the_rest() {
        let f = Filling::new(10, None);
        assert!(f.push(b"abcd"));
        assert!(f.wait_for(4).await);
        let mut out = [0u8; 3];
        assert!(f.copy_to(1, &mut out));
        assert_eq!(&out, b"bcd");
        assert!(!f.copy_to(2, &mut out), "past what arrived");

        let f2 = f.clone();
        let waiter = tokio::spawn(async move { f2.wait_for(8).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "woken before its bytes arrived");
        assert!(f.push(b"ef"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "woken by bytes short of its position");
        assert!(f.push(b"ghij"));
        assert!(waiter.await.unwrap());
        assert!(!f.push(b"k"), "past the length");
        assert_eq!(&f.bytes()[..], b"abcdefghij");
    }

    #[tokio::test]
    async fn bytes_read_in_place_are_published_like_pushed_ones() {
        let f = Filling::new(10, None);
        assert!(f.push(b"ab"));
        let f2 = f.clone();
        let waiter = tokio::spawn(async move { f2.wait_for(6).await });
        let got = f.push_from(4, &mut |room| {
            assert_eq!(room.remaining_mut(), 4, "the room is what was asked for");
            room.put_slice(b"cd");
            Ok(())
        });
        assert_eq!(got.map(|r| r.ok()), Some(Some(2)), "a short read appends what it read");
        assert_eq!(f.received(), 4);
        assert!(f.push_from(7, &mut |_| panic!("handed room past the length")).is_none());
        let failed = f.push_from(6, &mut |room| {
            room.put_slice(b"ef");
            Err(io::Error::other("reset"))
        });
        assert!(matches!(failed, Some(Err(_))), "the reader's error is passed on");
        assert!(waiter.await.unwrap(), "bytes before the error still count and wake readers");
        assert_eq!(&f.bytes()[..], b"abcdef");
    }

    #[tokio::test]
    async fn a_failed_fetch_releases_its_readers() {
        let f = Filling::new(10, None);
        assert!(f.push(b"ab"));
        let f2 = f.clone();
        let waiter = tokio::spawn(async move { f2.wait_for(5).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        f.close();
        assert!(!waiter.await.unwrap(), "a reader whose bytes never came is told so");
        assert!(!f.wait_for(5).await);
        assert!(f.wait_for(2).await);
    }

    /// With a manifest, readers see whole chunks once they check out, and nothing from the
    /// first bad one on; the bad chunks are listed for the run.
    #[tokio::test]
    async fn a_verified_run_shows_checked_chunks_only() {
        const CS: usize = 4096;
        let image: Vec<u8> = (0..5 * CS + 100).map(|i| (i % 251) as u8).collect();
        let manifest = Arc::new(Manifest::build(&image[..], CS as u64, |_| {}).unwrap());
        // A run of chunks 1..=5 (the last one short: the image's end), chunk 3 corrupt.
        let mut run = image[CS..].to_vec();
        run[2 * CS + 7] ^= 0xff;
        let f = Filling::new(run.len(), Some(ChunkCheck { manifest, first: 1, chunk_size: CS }));
        assert!(f.push(&run[..CS + 10]));
        assert!(f.wait_for(CS).await, "chunk 1 is whole and good");
        let mut out = [0u8; 10];
        assert!(!f.copy_to(CS, &mut out), "chunk 2 is not whole yet");
        // The rest read in place, as a socket does: checked the same way.
        let rest = &run[CS + 10..];
        let took = f.push_from(rest.len(), &mut |room| {
            room.put_slice(rest);
            Ok(())
        });
        assert_eq!(took.map(|r| r.ok()), Some(Some(rest.len())));
        assert!(f.copy_to(CS, &mut out), "chunk 2 checked good");
        assert_eq!(&out, &image[2 * CS..2 * CS + 10]);
        assert!(!f.copy_to(2 * CS, &mut out), "chunk 3 is bad");
        assert!(!f.copy_to(4 * CS, &mut out), "nothing past a bad chunk");
        f.close();
        assert!(!f.wait_for(3 * CS).await);
        assert_eq!(f.bad_chunks(), [3]);
        assert_eq!(f.bytes().len(), run.len(), "the run still holds every byte that came");
    }

    #[tokio::test]
    async fn many_readers_and_one_writer_agree_on_every_byte() {
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 + i / 4096) as u8).collect();
        let f = Filling::new(data.len(), None);
        let readers: Vec<_> = (0..8)
            .map(|r| {
                let (f, data) = (f.clone(), data.clone());
                tokio::spawn(async move {
                    for k in 0..64 {
                        let at = (k * 16384 + r * 977) % (data.len() - 4096);
                        assert!(f.wait_for(at + 4096).await);
                        let mut out = vec![0u8; 4096];
                        assert!(f.copy_to(at, &mut out));
                        assert_eq!(out, data[at..at + 4096]);
                    }
                })
            })
            .collect();
        for piece in data.chunks(3000) {
            assert!(f.push(piece));
            tokio::task::yield_now().await;
        }
        f.close();
        for r in readers {
            r.await.unwrap();
        }
    }
}
