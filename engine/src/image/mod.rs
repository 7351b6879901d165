//! `LazyImage`: random access to an image's bytes, served from the local cache when present and
//! fetched from the origin on a miss.
//!
//! Under one lock a read sorts each chunk it needs into present (read from the cache file), in
//! flight (wait on the fetch already running: single-flight) or missing (claim it). Claimed chunks
//! are grouped into runs of adjacent chunks, each one ranged request (coalescing); readers of a
//! run another read started take its bytes as they arrive (`Filling`). Sequential
//! streams grow a readahead window whose runs go through a separate, smaller pool so they never
//! starve demand misses. Fetched chunks are verified against the manifest when there is one,
//! written to the cache, and only then marked present; a background task persists the bitmap.
//! Read-ahead runs are written around the page cache and kept in memory until their reader has
//! copied them (`RunKind`, `copy_recent`).
//!
//! Here: the types, opening, and the public interface (`plan_read` is the backends' one way in);
//! `read` plans reads and claims misses, `fetch` fetches and writes them to the cache,
//! `readahead` grows sequential windows, `recent` keeps read-ahead runs for their readers,
//! `flush` makes the bitmap and counters durable.

use crate::cache::{cache_key, evict_unused, Bitmap, CacheHeader, CacheStore, CACHE_FORMAT_VERSION};
use crate::error::{Error, ErrorKind, Result};
use crate::filling::{ChunkCheck, Filling};
use crate::lock;
use crate::manifest::{check_chunk_size, Manifest};
use crate::source::{ImageInfo, RangeSource, RetryPolicy, Retrying};
use crate::stats::{Stats, StatsSnapshot};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

mod fetch;
mod flush;
mod read;
mod readahead;
mod recent;
#[cfg(test)]
mod tests;

use flush::flusher;

/// Default chunk size (the unit of caching, verification and the smallest fetch). Chosen by
/// `bench/run.py --chunk-size` (see bench/README.md): 16 KiB halves the origin bytes of random
/// 4 KiB reads against 32 KiB with no loss in sequential rate or latency.
pub const DEFAULT_CHUNK_SIZE: u64 = 16 * 1024;

/// How far a miss right after attach reaches around itself (see `widen_startup_miss`).
const STARTUP_SPAN: u64 = 64 << 10;

/// A read at least this large comes from the kernel's own read-ahead (the loop device asks in
/// 1 MiB steps): the reader above is already known to be sequential, so the stream's window
/// opens at its second read, `LARGE_READ_WINDOWS` reads wide. Grown from 512 KiB it left the
/// origin idle for round trips at the start of every large file.
const LARGE_READ: u64 = 256 << 10;
const LARGE_READ_WINDOWS: u64 = 64;

/// Requests a background fill keeps in flight, and their size. A reader whose chunk a fill
/// request is fetching waits for that whole request, so they are small and few.
const FILL_REQUESTS: usize = 2;
const FILL_REQUEST_BYTES: u64 = 1 << 20;

/// How `fill_until_complete` waits before starting a stopped fill again.
#[derive(Debug, Clone)]
pub struct FillResume {
    pub first_pause: Duration,
    pub max_pause: Duration,
}

impl Default for FillResume {
    /// Long enough that an origin outage costs a few requests, short enough that a node
    /// resumes within minutes of the origin's return.
    fn default() -> Self {
        FillResume { first_pause: Duration::from_secs(10), max_pause: Duration::from_secs(600) }
    }
}

#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub cache_root: PathBuf,
    /// Node-wide limit on bytes under `cache_root`; unused images are evicted to honour it.
    pub cache_limit: Option<u64>,
    /// Ignored when a manifest is given: the manifest's chunk size is used.
    pub chunk_size: u64,
    pub manifest: Option<Manifest>,
    /// Requests for data a reader is waiting on.
    pub demand_fetches: usize,
    /// Requests issued ahead of sequential readers.
    pub readahead_fetches: usize,
    /// Largest single ranged request. The default, 8 MiB, with eight read-ahead requests keeps a
    /// whole 64 MiB window in flight (chosen against 4 MiB, bench/README.md).
    pub max_request: u64,
    pub readahead_initial: u64,
    /// 0 disables readahead (for purely random access).
    pub readahead_max: u64,
    /// Fetched bytes whose cache write has not ended that may be in memory at once. Read-ahead,
    /// fills and prefetches wait for room before they fetch (demand fetches take room when
    /// there is some and never wait): where the origin outruns the cache disk, the backlog of
    /// writes would otherwise grow with the image. The default, 256 MiB, is about twice what a
    /// cold 512 MiB read here ever used (32 MiB in flight with 4 MiB requests, up to 104 MiB
    /// of writes behind, with nginx reading the same disk), so only a disk that stays behind is
    /// waited for.
    pub write_behind: u64,
    pub retry: RetryPolicy,
    /// How often the bitmap and stats are persisted.
    pub flush_interval: Duration,
    /// Misses right after attach that fetch the 64 KiB around them (filesystem metadata lies
    /// close together); 0 fetches only what is missed from the start.
    pub startup_misses: u32,
    /// The whole blob's digest (`sha256:...`, a content-addressed blob such as an OCI layer):
    /// checked once every chunk is cached. A mismatch drops the cache and fails every read.
    pub blob_digest: Option<String>,
}

impl ImageConfig {
    pub fn new(cache_root: impl Into<PathBuf>) -> Self {
        ImageConfig {
            cache_root: cache_root.into(),
            cache_limit: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            manifest: None,
            demand_fetches: 32,
            readahead_fetches: 8,
            max_request: 8 << 20,
            readahead_initial: 512 << 10,
            readahead_max: 64 << 20,
            write_behind: 256 << 20,
            retry: RetryPolicy::default(),
            flush_interval: Duration::from_secs(1),
            startup_misses: 32,
            blob_digest: None,
        }
    }
}

/// The volume condition a CSI plugin reports: abnormal with a message when reads are failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub abnormal: bool,
    pub message: String,
}

#[derive(Clone)]
struct Run {
    first: u64,
    data: Bytes,
    /// Chunks that failed verification twice: readers of these get EIO, never the bytes.
    bad: Vec<u64>,
    /// Bytes readers copied from the run, while its cache write ran and then as a recent run;
    /// shared by clones. A sequential reader reads most runs before their write ends: when
    /// only copies from recent runs counted, every run it had already read stayed in memory
    /// until pushed out, and a 512 MiB read held all 128 MiB of recent runs.
    served: Arc<AtomicUsize>,
}

impl Run {
    fn new(first: u64, data: Bytes, bad: Vec<u64>, served: Arc<AtomicUsize>) -> Self {
        Run { first, data, bad, served }
    }

    /// Counts `n` bytes copied from the run; true once readers have copied as many as it holds.
    fn count_served(&self, n: usize) -> bool {
        served_whole(&self.served, n, self.data.len())
    }

    fn read_whole(&self) -> bool {
        self.served.load(Ordering::Relaxed) >= self.data.len()
    }
}

/// Adds `n` to a run's bytes served; true once they reach its `len`.
fn served_whole(served: &AtomicUsize, n: usize, len: usize) -> bool {
    served.fetch_add(n, Ordering::Relaxed) + n >= len
}

type RunFuture = Shared<BoxFuture<'static, Result<Run>>>;

/// A run being fetched, as readers find it: its result, and its bytes as they arrive.
#[derive(Clone)]
struct InFlight {
    fut: RunFuture,
    /// Its first chunk.
    first: u64,
    fill: Arc<Filling>,
    /// `Run::served`, counted from the first byte a reader copies.
    served: Arc<AtomicUsize>,
}

/// Why a run is fetched: decides its fetch pool and how it is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum RunKind {
    /// A reader waits on it.
    Demand,
    /// Ahead of a sequential reader, who reads it within moments.
    Readahead,
    /// The background fill beside readers (`fill_in_background`).
    Fill,
    /// `prefetch_all`: nobody reads meanwhile.
    Prefetch,
}

impl RunKind {
    fn readahead_pool(self) -> bool {
        matches!(self, RunKind::Readahead | RunKind::Fill)
    }

    /// Written around the page cache: copying fetched bytes into the cache file's page cache
    /// was 36-52% of the CPU of filling an image (`lazy-image warm`), and the filesystem above
    /// caches what its readers read anyway. Demand and fill runs keep the page cache: random
    /// readers find them there later.
    fn direct(self) -> bool {
        matches!(self, RunKind::Readahead | RunKind::Prefetch)
    }

    /// Kept in memory after its direct write for the reader it was fetched ahead of.
    fn kept_for_reader(self) -> bool {
        self == RunKind::Readahead
    }
}

/// How long a read-ahead run stays in memory for its reader at most.
const RECENT_TTL: Duration = Duration::from_secs(5);

/// A read-ahead run kept for the reader it was fetched ahead of; dropped once readers copied as
/// many bytes as it holds (`Run::served`; the filesystem above caches what it read).
struct Recent {
    run: Run,
    at: Instant,
}

struct State {
    present: Bitmap,
    inflight: HashMap<u64, InFlight>,
    /// Cache writes done, and how many of them the last successful flush made durable: the
    /// bitmap needs persisting while `written > synced`.
    written: u64,
    synced: u64,
    /// Chunk ranges marked present since the flush in progress (or the last one) took them: if
    /// a sync fails, their data may never reach the disk (a failed writeback leaves pages that
    /// read back wrong once evicted), so they are marked missing again.
    unsynced: Vec<(u64, u64)>,
}

#[derive(Clone, Copy)]
struct Stream {
    next: u64,
    window: u64,
    frontier: u64,
    /// Reads that continued this stream. Readahead starts at the second: one read landing near
    /// another by chance is how random access looks, and it must not cost a window of fetches.
    hits: u32,
}

#[derive(Default)]
struct Health {
    /// Sticky: the image at the origin is not the one attached, or served corrupt chunks.
    fatal: Option<String>,
    /// Cleared by the next successful fetch.
    transient: Option<String>,
    /// The last cache write failed (a full disk, an I/O error); cleared by the next that works.
    cache: Option<String>,
}

struct Inner {
    source: Arc<dyn RangeSource>,
    info: ImageInfo,
    chunk_size: u64,
    chunks: u64,
    cfg: ImageConfig,
    /// `cfg.manifest`, shared with the checks of runs in flight.
    manifest: Option<Arc<Manifest>>,
    store: CacheStore,
    state: Mutex<State>,
    streams: Mutex<Vec<Stream>>,
    /// Read-ahead runs written around the page cache, oldest first: the sequential reader they
    /// were fetched for reads them soon after they land.
    recent: Mutex<VecDeque<Recent>>,
    demand_slots: Semaphore,
    readahead_slots: Semaphore,
    /// Room for fetched bytes not yet written to the cache, in KiB (`ImageConfig::write_behind`).
    write_room: Arc<Semaphore>,
    stats: Arc<Stats>,
    health: Mutex<Health>,
    /// Cache writes still running after their readers were answered; `close` waits for them.
    writes_pending: AtomicUsize,
    /// One flush at a time: the periodic flusher and `close` at once raced on stats.json's
    /// temporary file (one rename found it gone), and an older bitmap snapshot could land on
    /// disk after a newer one.
    flushing: Arc<tokio::sync::Mutex<()>>,
    writes_done: Notify,
    /// Misses left that `widen_startup_miss` widens.
    startup_left: AtomicU32,
    /// The runtime the image was opened on: fetches started from threads that have no runtime
    /// (ublk queues, FUSE) are spawned here.
    rt: tokio::runtime::Handle,
    /// `cfg.blob_digest`'s check: `BLOB_*`.
    blob_check: std::sync::atomic::AtomicU8,
}

const BLOB_UNCHECKED: u8 = 0;
const BLOB_CHECKING: u8 = 1;
const BLOB_GOOD: u8 = 2;
const BLOB_BAD: u8 = 3;

/// How to serve a read without waiting, as `LazyImage::plan_read` decides it.
#[derive(Debug)]
pub enum ReadPlan<'a> {
    /// Every byte was cached and is now in the caller's buffer: this many (fewer at the end of
    /// the image, 0 past it).
    Copied(usize),
    /// Every byte is cached: read `len` bytes at `offset` of the cache's data file (byte `o` of
    /// the image is at `o`), through `file`, or through `direct` (opened with `O_DIRECT`) for a
    /// read aligned to `cache::DIRECT_ALIGN` where skipping the page cache pays (small reads:
    /// the filesystem above the device caches them). A direct read failing with EINVAL: call
    /// `direct_refused` and read through `file`.
    File { file: BorrowedFd<'a>, direct: Option<BorrowedFd<'a>>, offset: u64, len: usize },
    /// Some byte is not cached: `read_into` fetches it.
    Miss,
}

/// A read whose chunks are all cached (`LazyImage::cached`): where it ends (clipped to the
/// image), its first and last chunk, and whether every cache write is on disk.
struct Hit {
    end: u64,
    chunks: (u64, u64),
    settled: bool,
}

/// A lazily fetched image. Cheap to clone; all clones share cache and counters.
#[derive(Clone)]
pub struct LazyImage {
    inner: Arc<Inner>,
}

impl LazyImage {
    /// Probes the origin, opens (or resets) the cache and starts the background flusher.
    pub async fn open(source: Arc<dyn RangeSource>, mut cfg: ImageConfig) -> Result<Self> {
        let stats = Arc::new(Stats::default());
        let source: Arc<dyn RangeSource> = Arc::new(Retrying::new(source, cfg.retry.clone(), stats.clone()));
        let info = source.probe().await?;
        if info.size == 0 {
            return Err(Error::new(ErrorKind::InvalidInput, format!("{} is empty", source.describe())));
        }
        let chunk_size = match &cfg.manifest {
            Some(m) => {
                if m.size != info.size {
                    return Err(Error::new(
                        ErrorKind::Integrity,
                        format!("manifest is for a {}-byte image but {} has {} bytes", m.size, source.describe(), info.size),
                    ));
                }
                m.chunk_size
            }
            None => cfg.chunk_size,
        };
        check_chunk_size(chunk_size)?;
        let manifest_digest = cfg.manifest.as_ref().map(Manifest::digest);
        let url = source.describe();
        let key = cache_key(&url, manifest_digest.as_deref());
        let header = CacheHeader { format_version: CACHE_FORMAT_VERSION, url, info: info.clone(), chunk_size, manifest_digest };
        let budget = match cfg.cache_limit {
            Some(limit) => {
                let others = evict_unused(&cfg.cache_root, limit.saturating_sub(info.size), &key)?;
                Some(limit.saturating_sub(others))
            }
            None => None,
        };
        let (store, present) = CacheStore::open(&cfg.cache_root, &key, header, budget)?;
        tracing::info!(
            image = %source.describe(), size = info.size, chunk_size, cached_chunks = present.count_ones(),
            cache = %store.dir().display(), "image opened"
        );
        OPEN_IMAGES.fetch_add(1, Ordering::SeqCst);
        let inner = Arc::new(Inner {
            chunks: info.size.div_ceil(chunk_size),
            demand_slots: Semaphore::new(cfg.demand_fetches.max(1)),
            readahead_slots: Semaphore::new(cfg.readahead_fetches.max(1)),
            write_room: Arc::new(Semaphore::new(room_kib(cfg.write_behind, u64::MAX) as usize)),
            source,
            info,
            chunk_size,
            store,
            state: Mutex::new(State { present, inflight: HashMap::new(), written: 0, synced: 0, unsynced: Vec::new() }),
            streams: Mutex::new(Vec::new()),
            recent: Mutex::new(VecDeque::new()),
            stats,
            health: Mutex::new(Health::default()),
            writes_pending: AtomicUsize::new(0),
            flushing: Arc::new(tokio::sync::Mutex::new(())),
            startup_left: AtomicU32::new(cfg.startup_misses),
            writes_done: Notify::new(),
            rt: tokio::runtime::Handle::current(),
            manifest: cfg.manifest.take().map(Arc::new),
            cfg,
            blob_check: std::sync::atomic::AtomicU8::new(BLOB_UNCHECKED),
        });
        let weak = Arc::downgrade(&inner);
        let every = inner.cfg.flush_interval;
        tokio::spawn(flusher(weak, every));
        Ok(LazyImage { inner })
    }

    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    pub fn info(&self) -> &ImageInfo {
        &self.inner.info
    }

    pub fn chunk_size(&self) -> u64 {
        self.inner.chunk_size
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.inner.store.dir().to_path_buf()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats_snapshot()
    }

    /// (chunks present, chunks total).
    pub fn fill(&self) -> (u64, u64) {
        (lock(&self.inner.state).present.count_ones(), self.inner.chunks)
    }

    pub fn condition(&self) -> Condition {
        let h = lock(&self.inner.health);
        match h.fatal.as_ref().or(h.transient.as_ref()).or(h.cache.as_ref()) {
            Some(m) => Condition { abnormal: true, message: m.clone() },
            None => Condition { abnormal: false, message: "healthy".into() },
        }
    }

    /// Returns the image's bytes in `[offset, offset + len)`, shortened at the end of the image.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        let end = offset.saturating_add(len).min(self.inner.info.size);
        let mut out = vec![0u8; end.saturating_sub(offset) as usize];
        let n = self.read_into(offset, &mut out).await?;
        out.truncate(n);
        Ok(Bytes::from(out))
    }

    /// Like `read`, into `buf` (its length is what is asked for); returns how many bytes were
    /// written, fewer at the end of the image. A transport with a buffer of its own (a FUSE ring
    /// entry) saves an allocation and a copy per read: at 1 MiB requests those were a tenth of
    /// the CPU of a cold sequential read.
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if self.inner.blob_check.load(Ordering::SeqCst) == BLOB_BAD {
            self.inner.stats.count_error();
            let why = lock(&self.inner.health).fatal.clone().unwrap_or_default();
            return Err(Error::new(ErrorKind::Integrity, why));
        }
        let r = self.inner.read_into(offset, buf, true).await;
        match &r {
            Ok(n) => self.inner.stats.count_read(*n as u64),
            Err(_) => self.inner.stats.count_error(),
        }
        r
    }

    /// The one way a block backend serves a read (`buf.len()` bytes at `offset`) without
    /// waiting: the engine decides, from what its cache holds, whether the bytes are already
    /// copied (memory held them: read-ahead runs just written), are to be read from the cache
    /// file (where, and whether a direct descriptor may be used), or are a miss for `read_into`.
    /// A hit is counted and drives read-ahead here, as any read does. Callable from any thread.
    pub fn plan_read(&self, offset: u64, buf: &mut [u8]) -> ReadPlan<'_> {
        let inner = &self.inner;
        if offset >= inner.info.size || buf.is_empty() {
            return ReadPlan::Copied(0);
        }
        let Some(hit) = self.cached(offset, buf.len()) else { return ReadPlan::Miss };
        self.count_hit(offset, &hit);
        let len = (hit.end - offset) as usize;
        if inner.copy_recent(offset, &mut buf[..len]) {
            return ReadPlan::Copied(len);
        }
        // A direct descriptor only while the cache is settled: every cache write on disk and
        // none running. Otherwise a direct read first waits for the writeback of its range, or
        // behind a write for the inode lock, which beside a background fill cost readers dearly.
        let direct = (hit.settled && inner.writes_pending.load(Ordering::SeqCst) == 0).then(|| inner.store.data_direct_fd()).flatten();
        ReadPlan::File { file: inner.store.data_fd(), direct, offset, len }
    }

    /// `buf.len()` bytes at `offset` (fewer at the end) read here only if that needs no wait:
    /// every chunk cached and every page of them in the page cache. `None` otherwise (use
    /// `read_into`), with nothing counted. For threads that must not block on the disk, such as
    /// a backend's queue decoding compressed blocks itself.
    pub fn read_resident(&self, offset: u64, buf: &mut [u8]) -> Result<Option<usize>> {
        let inner = &self.inner;
        if offset >= inner.info.size || buf.is_empty() {
            return Ok(Some(0));
        }
        let Some(hit) = self.cached(offset, buf.len()) else { return Ok(None) };
        let len = (hit.end - offset) as usize;
        if !inner.copy_recent(offset, &mut buf[..len]) && !inner.store.read_nowait(&mut buf[..len], offset)? {
            return Ok(None);
        }
        self.count_hit(offset, &hit);
        Ok(Some(len))
    }

    /// For a read of `len` (> 0) bytes at `offset` (< the image's size): where it ends and
    /// whether the cache is settled, when every chunk it covers is cached; `None` on a miss.
    fn cached(&self, offset: u64, len: usize) -> Option<Hit> {
        let inner = &self.inner;
        let end = offset.saturating_add(len as u64).min(inner.info.size);
        let chunks = (offset / inner.chunk_size, (end - 1) / inner.chunk_size);
        let st = lock(&inner.state);
        (chunks.0..=chunks.1).all(|c| st.present.get(c)).then(|| Hit { end, chunks, settled: st.written == st.synced })
    }

    /// A hit is counted and drives read-ahead, as any read does.
    fn count_hit(&self, offset: u64, hit: &Hit) {
        let inner = &self.inner;
        inner.stats.count_chunks(hit.chunks.1 - hit.chunks.0 + 1, 0);
        inner.stats.count_read(hit.end - offset);
        if let Some((a, b)) = inner.readahead_range(offset, hit.end) {
            inner.start_readahead(a, b);
        }
    }

    /// A hit served on the caller's thread: `plan_read`, with the cache file read here. `None`
    /// on a miss (use `read_into`).
    pub fn read_cached_into(&self, offset: u64, buf: &mut [u8]) -> Result<Option<usize>> {
        match self.plan_read(offset, buf) {
            ReadPlan::Copied(n) => Ok(Some(n)),
            ReadPlan::File { offset, len, .. } => match self.inner.store.read_at(&mut buf[..len], offset) {
                Ok(()) => Ok(Some(len)),
                Err(e) => {
                    self.inner.stats.count_error();
                    Err(e)
                }
            },
            ReadPlan::Miss => Ok(None),
        }
    }

    /// A direct descriptor of a `ReadPlan::File` failed a read with EINVAL (the filesystem
    /// refuses direct I/O after all): plans offer none from now on.
    pub fn direct_refused(&self) {
        self.inner.store.direct_refused()
    }

    /// The cache's data file when every chunk is in it: then it holds exactly the image, byte `o`
    /// at offset `o`, and is never written again (only misses are written, and a cache reset
    /// makes a new file), so it can be read directly, e.g. by a loop device, with no server.
    pub fn complete_data_file(&self) -> Option<PathBuf> {
        let (have, total) = self.fill();
        (have == total).then(|| self.inner.store.data_path())
    }

    /// Fetches every missing chunk as fast as the origin allows (`lazy-image warm`): `parallel`
    /// requests of up to `max_request` at a time through the demand pool; `progress` gets
    /// (chunks present, chunks total). Ends like `fill_in_background`.
    pub async fn prefetch_all(&self, parallel: usize, progress: impl FnMut(u64, u64)) -> Result<()> {
        self.fill_missing(parallel.max(1), self.inner.cfg.max_request, RunKind::Prefetch, progress).await
    }

    /// Fetches every chunk still missing while the image is in use: through the readahead pool,
    /// so readers' misses keep their own fetch slots, and only `FILL_REQUESTS` requests of
    /// `FILL_REQUEST_BYTES` at a time, so readers still get most of the origin and the CPU.
    /// Returns once the image is complete in the cache, or with what stopped it (origin changed,
    /// retries exhausted, a corrupt chunk, a cache limit with no room for the whole image).
    /// Dropping the future stops it; fetches already started finish on their own.
    pub async fn fill_in_background(&self) -> Result<()> {
        self.fill_missing(FILL_REQUESTS, FILL_REQUEST_BYTES, RunKind::Fill, |_, _| {}).await
    }

    /// `fill_in_background` for a long-lived process (a node plugin, a mount daemon): when the fill
    /// stops on something the origin may get over (retries ran out, transport, 5xx), it starts
    /// again after a pause that doubles from `resume.first_pause` to `resume.max_pause` (back to
    /// the first after a pass that made progress); `on_pause` hears each such stop. Returns once
    /// the image is complete, or with an error no pause can mend: the origin changed, a chunk
    /// failed verification, the cache cannot hold the image or cannot be written.
    pub async fn fill_until_complete(&self, resume: &FillResume, mut on_pause: impl FnMut(&Error, Duration)) -> Result<()> {
        let mut pause = resume.first_pause;
        loop {
            let before = self.fill().0;
            match self.fill_in_background().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() || e.kind() == ErrorKind::DeadlineExceeded => {
                    if self.fill().0 > before {
                        pause = resume.first_pause;
                    }
                    on_pause(&e, pause);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(resume.max_pause);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Walks the image in order and fetches the chunks neither present nor in flight, `requests`
    /// of at most `request_bytes` at a time, through the readahead or the demand pool.
    async fn fill_missing(&self, requests: usize, request_bytes: u64, kind: RunKind, mut progress: impl FnMut(u64, u64)) -> Result<()> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        let inner = &self.inner;
        let per = (request_bytes.min(inner.cfg.max_request) / inner.chunk_size).max(1);
        // A second pass picks up chunks a reader's fetch had claimed and then failed.
        for _pass in 0..2 {
            let mut s = stream::iter((0..inner.chunks).step_by(per as usize))
                .map(|a| {
                    let me = inner.clone();
                    async move {
                        // Claimed only when its turn comes: chunks readers fetched meanwhile are skipped.
                        let runs = me.claim_missing(a, (a + per).min(me.chunks), kind);
                        for f in &runs {
                            me.rt.spawn(f.clone());
                        }
                        for f in runs {
                            let run = f.await?;
                            if let Some(bad) = run.bad.first() {
                                return Err(Error::new(
                                    ErrorKind::Integrity,
                                    format!("{}: chunk {bad} does not match the manifest", me.source.describe()),
                                ));
                            }
                        }
                        Ok(())
                    }
                })
                .buffer_unordered(requests);
            while s.try_next().await?.is_some() {
                let (have, total) = self.fill();
                progress(have, total);
            }
            self.settle().await;
            let (have, total) = self.fill();
            progress(have, total);
            if have == total {
                return Ok(());
            }
        }
        let (have, total) = self.fill();
        Err(Error::new(
            ErrorKind::CacheIo,
            format!("{} of {total} chunks could not be cached: the cache limit leaves no room for the whole image", total - have),
        ))
    }

    /// Persists the bitmap and stats now (also done periodically and by `close`).
    pub async fn flush(&self) -> Result<()> {
        self.inner.clone().flush().await
    }

    /// Waits for fetches in flight and their cache writes, then flushes. Readers must be gone.
    pub async fn close(self) -> Result<()> {
        self.settle().await;
        self.flush().await
    }

    /// Waits until every fetch in flight has finished and its chunks are written (or given up).
    async fn settle(&self) {
        let pending: Vec<RunFuture> = lock(&self.inner.state).inflight.values().map(|f| f.fut.clone()).collect();
        for f in pending {
            let _ = f.await;
        }
        loop {
            let done = self.inner.writes_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.inner.writes_pending.load(Ordering::SeqCst) == 0 {
                break;
            }
            done.await;
        }
    }
}

enum Slot {
    Cache,
    Wait(InFlight),
}

/// `bytes` in the KiB units of `write_room`, at least 1 and at most `cap`: a run larger than all
/// the room still goes, alone.
fn room_kib(bytes: u64, cap: u64) -> u32 {
    bytes.div_ceil(1024).clamp(1, cap.min(Semaphore::MAX_PERMITS as u64).min(u32::MAX as u64)) as u32
}

fn drop_expired(recent: &mut VecDeque<Recent>) {
    recent.retain(|r| r.at.elapsed() <= RECENT_TTL);
}

/// Spawns a run its reader was driving if that reader goes away before the run ends: other
/// readers and `settle` wait on it, and its chunks stay claimed until it ends.
struct DriveIfDropped<'a> {
    run: Option<RunFuture>,
    rt: &'a tokio::runtime::Handle,
}

/// Images open in this process; when the last one goes, so do the pooled buffers.
static OPEN_IMAGES: AtomicUsize = AtomicUsize::new(0);

impl Drop for Inner {
    fn drop(&mut self) {
        if OPEN_IMAGES.fetch_sub(1, Ordering::SeqCst) == 1 {
            crate::cache::trim_all_buffers();
        }
    }
}

impl Drop for DriveIfDropped<'_> {
    fn drop(&mut self) {
        if let Some(run) = self.run.take().filter(|r| r.peek().is_none()) {
            self.rt.spawn(run);
        }
    }
}
