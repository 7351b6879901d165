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
}

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
        let end = offset.saturating_add(buf.len() as u64).min(inner.info.size);
        let (c0, c1) = (offset / inner.chunk_size, (end - 1) / inner.chunk_size);
        let settled = {
            let st = lock(&inner.state);
            if !(c0..=c1).all(|c| st.present.get(c)) {
                return ReadPlan::Miss;
            }
            st.written == st.synced
        };
        inner.stats.count_chunks(c1 - c0 + 1, 0);
        inner.stats.count_read(end - offset);
        if let Some((a, b)) = inner.readahead_range(offset, end) {
            inner.start_readahead(a, b);
        }
        let len = (end - offset) as usize;
        if inner.copy_recent(offset, &mut buf[..len]) {
            return ReadPlan::Copied(len);
        }
        // A direct descriptor only while the cache is settled: every cache write on disk and
        // none running. Otherwise a direct read first waits for the writeback of its range, or
        // behind a write for the inode lock, which beside a background fill cost readers dearly.
        let direct = (settled && inner.writes_pending.load(Ordering::SeqCst) == 0).then(|| inner.store.data_direct_fd()).flatten();
        ReadPlan::File { file: inner.store.data_fd(), direct, offset, len }
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

async fn flusher(weak: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        inner.expire_recent();
        crate::cache::trim_idle_buffers();
        if let Err(e) = inner.flush().await {
            tracing::warn!(error = %e.report(), "persisting cache state failed");
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

impl Inner {
    fn chunk_range(&self, c: u64) -> (u64, u64) {
        let start = c * self.chunk_size;
        (start, (start + self.chunk_size).min(self.info.size))
    }

    /// Fills `out[..n]` with the image's bytes at `offset`, where `n` is `out.len()` shortened at
    /// the end of the image; returns `n`.
    async fn read_into(self: &Arc<Self>, offset: u64, out: &mut [u8], allow_readahead: bool) -> Result<usize> {
        if offset >= self.info.size || out.is_empty() {
            return Ok(0);
        }
        let end = offset.saturating_add(out.len() as u64).min(self.info.size);
        let (c0, c1) = (offset / self.chunk_size, (end - 1) / self.chunk_size);
        let ahead = if allow_readahead { self.readahead_range(offset, end) } else { None };

        let mut plan = Vec::with_capacity((c1 - c0 + 1) as usize);
        let mut new_runs = Vec::new();
        {
            let mut st = lock(&self.state);
            let mut claim_from: Option<u64> = None;
            let (mut hits, mut misses) = (0, 0);
            for c in c0..=c1 {
                if st.present.get(c) {
                    hits += 1;
                    plan.push(Slot::Cache);
                } else if let Some(f) = st.inflight.get(&c) {
                    // Fetched and verified, its cache write still running: served from memory.
                    if matches!(f.fut.peek(), Some(Ok(_))) {
                        hits += 1;
                    } else {
                        misses += 1;
                    }
                    plan.push(Slot::Wait(f.clone()));
                } else {
                    misses += 1;
                    claim_from.get_or_insert(c);
                    plan.push(Slot::Cache); // replaced below once the run exists
                }
                let run_ends = claim_from.is_some() && (c == c1 || st.present.get(c + 1) || st.inflight.contains_key(&(c + 1)));
                if run_ends {
                    if let Some(first) = claim_from.take() {
                        let (a, b) = if first == c0 && c == c1 { self.widen_startup_miss(&st, first, c + 1) } else { (first, c + 1) };
                        for f in self.claim_runs(&mut st, a, b, RunKind::Demand) {
                            for k in f.0.max(c0)..f.1.min(c1 + 1) {
                                plan[(k - c0) as usize] = Slot::Wait(f.2.clone());
                            }
                            new_runs.push(f.2.fut);
                        }
                    }
                }
            }
            self.stats.count_chunks(hits, misses);
        }
        // A read that waits on one new run and nothing else drives that run itself: spawning it
        // would wake another runtime worker on the way to the origin. Should this read be
        // dropped before the run ends, the guard hands the run to the runtime.
        let lone = new_runs.len() == 1 && plan.iter().all(|s| matches!(s, Slot::Wait(f) if f.fut.ptr_eq(&new_runs[0])));
        // Other runs' bytes are taken as they arrive (checked chunk by chunk for a verified
        // image); a run this read drives is awaited whole: it is its own, and small.
        let stream = !lone;
        let _driver = if lone {
            DriveIfDropped { run: new_runs.pop(), rt: &self.rt }
        } else {
            for f in new_runs {
                tokio::spawn(f);
            }
            DriveIfDropped { run: None, rt: &self.rt }
        };
        if let Some((a, b)) = ahead {
            self.start_readahead(a, b);
        }

        let mut i = 0usize;
        while i < plan.len() {
            let c = c0 + i as u64;
            match &plan[i] {
                Slot::Cache => {
                    let mut j = i + 1;
                    while j < plan.len() && matches!(plan[j], Slot::Cache) {
                        j += 1;
                    }
                    let a = (c * self.chunk_size).max(offset);
                    let b = self.chunk_range(c0 + j as u64 - 1).1.min(end);
                    self.read_present(&mut out[(a - offset) as usize..(b - offset) as usize], a)?;
                    i = j;
                }
                Slot::Wait(f) => {
                    // The chunks from here on that the same run holds, as one piece.
                    let mut j = i + 1;
                    while j < plan.len() && matches!(&plan[j], Slot::Wait(g) if g.fut.ptr_eq(&f.fut)) {
                        j += 1;
                    }
                    let a = (c * self.chunk_size).max(offset);
                    let b = self.chunk_range(c0 + j as u64 - 1).1.min(end);
                    let base = f.first * self.chunk_size;
                    let dst = &mut out[(a - offset) as usize..(b - offset) as usize];
                    let streamed = stream && f.fill.wait_for((b - base) as usize).await && f.fill.copy_to((a - base) as usize, dst);
                    if !streamed {
                        let run = f.fut.clone().await?;
                        if let Some(bad) = (c..c0 + j as u64).find(|k| run.bad.contains(k)) {
                            let (cs, ce) = self.chunk_range(bad);
                            return Err(Error::new(
                                ErrorKind::Integrity,
                                format!("{}: chunk {bad} (bytes {cs}..{ce}) does not match the manifest", self.source.describe()),
                            ));
                        }
                        dst.copy_from_slice(&run.data[(a - base) as usize..(b - base) as usize]);
                    }
                    if served_whole(&f.served, (b - a) as usize, f.fill.len()) {
                        // Read whole: a reader waiting on it may finish after its write did.
                        lock(&self.recent).retain(|r| !Arc::ptr_eq(&r.run.served, &f.served));
                    }
                    i = j;
                }
            }
        }
        Ok((end - offset) as usize)
    }

    /// The run to fetch for a read whose chunks `[first, end)` are all missing: while the attach
    /// is young (its first `startup_misses` such reads), the free chunks around it up to the
    /// aligned `STARTUP_SPAN` come along. A mount, `ls` and the first opens read filesystem
    /// metadata that lies close together: ext4's root and `etc` directory blocks 24 KiB apart
    /// were two round trips. Costs at most `startup_misses` spans per attach.
    fn widen_startup_miss(&self, st: &State, first: u64, end: u64) -> (u64, u64) {
        let per = STARTUP_SPAN / self.chunk_size;
        if per <= 1 || self.startup_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
            return (first, end);
        }
        let (lo, hi) = (first / per * per, end.div_ceil(per).saturating_mul(per).min(self.chunks));
        let free = |c: u64| !st.present.get(c) && !st.inflight.contains_key(&c);
        let (mut a, mut b) = (first, end);
        while a > lo && free(a - 1) {
            a -= 1;
        }
        while b < hi && free(b) {
            b += 1;
        }
        self.stats.count_readahead((first - a) + (b - end));
        (a, b)
    }

    /// Claims the chunks of `[a, b)` that are neither present nor in flight and starts fetching
    /// them through the readahead pool.
    fn start_readahead(self: &Arc<Self>, a: u64, b: u64) {
        let (r0, r1) = (a / self.chunk_size, b.div_ceil(self.chunk_size).min(self.chunks));
        for f in self.claim_missing(r0, r1, RunKind::Readahead) {
            self.rt.spawn(f);
        }
    }

    /// Claims the chunks in `[r0, r1)` that are neither present nor in flight, as runs for the
    /// readahead or the demand pool, and returns their futures for the caller to spawn.
    fn claim_missing(self: &Arc<Self>, r0: u64, r1: u64, kind: RunKind) -> Vec<RunFuture> {
        let mut runs = Vec::new();
        let mut claimed = 0;
        {
            let mut st = lock(&self.state);
            let mut c = r0;
            while c < r1 {
                if st.present.get(c) || st.inflight.contains_key(&c) {
                    c += 1;
                    continue;
                }
                let mut e = c;
                while e < r1 && !st.present.get(e) && !st.inflight.contains_key(&e) {
                    e += 1;
                }
                claimed += e - c;
                runs.extend(self.claim_runs(&mut st, c, e, kind).into_iter().map(|r| r.2.fut));
                c = e;
            }
        }
        if kind.readahead_pool() {
            self.stats.count_readahead(claimed);
        } else {
            self.stats.count_chunks(0, claimed);
        }
        runs
    }

    /// Splits chunks `[first, end)` into runs of at most `max_request` bytes, registers each as in
    /// flight and returns (first, end, future) per run. The caller spawns the futures.
    fn claim_runs(self: &Arc<Self>, st: &mut State, first: u64, end: u64, kind: RunKind) -> Vec<(u64, u64, InFlight)> {
        let per = (self.cfg.max_request / self.chunk_size).max(1);
        let mut out = Vec::new();
        let mut a = first;
        while a < end {
            let b = (a + per).min(end);
            let me = self.clone();
            let fill = Filling::new((self.chunk_range(b - 1).1 - a * self.chunk_size) as usize, self.chunk_check(a));
            let served = Arc::new(AtomicUsize::new(0));
            let (f2, s2) = (fill.clone(), served.clone());
            let fut: RunFuture = async move { me.fetch_run(a, b, kind, f2, s2).await }.boxed().shared();
            let flight = InFlight { fut, first: a, fill, served };
            for c in a..b {
                st.inflight.insert(c, flight.clone());
            }
            out.push((a, b, flight));
            a = b;
        }
        out
    }

    /// Fetches and verifies a run. Its readers get the bytes as they arrive (chunk by checked
    /// chunk for a verified image), or all at once when it ends; the cache write goes on behind
    /// them, and the chunks stay "in flight" (served from this run's
    /// bytes) until they are on disk and marked present.
    async fn fetch_run(self: Arc<Self>, first: u64, end: u64, kind: RunKind, fill: Arc<Filling>, served: Arc<AtomicUsize>) -> Result<Run> {
        let (result, room) = match self.write_room(first, end, kind).await {
            Ok(room) => (self.fetch_verified(first, end, kind.readahead_pool(), &fill, served).await, room),
            Err(e) => (Err(e), None),
        };
        // Whole or failed, nothing more arrives: readers waiting on bytes stop waiting.
        fill.close();
        match &result {
            Ok(run) => {
                lock(&self.health).transient = None;
                // Chunks that failed verification are not written: the next read refetches them.
                if !run.bad.is_empty() {
                    let mut st = lock(&self.state);
                    for c in &run.bad {
                        st.inflight.remove(c);
                    }
                }
                self.writes_pending.fetch_add(1, Ordering::SeqCst);
                let (me, run) = (self.clone(), run.clone());
                let write = move || {
                    // A panicking write must still release its chunks and `settle`.
                    let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.write_good_chunks(&run, kind.direct())))
                        .unwrap_or_else(|_| {
                            me.stats.count_cache_write_error();
                            tracing::warn!("cache write panicked; serving from memory");
                            false
                        });
                    if written && kind.kept_for_reader() && run.bad.is_empty() {
                        me.keep_recent(run.clone());
                    }
                    {
                        let mut st = lock(&me.state);
                        for c in (first..end).filter(|c| !run.bad.contains(c)) {
                            st.inflight.remove(&c);
                            if written {
                                st.present.set(c);
                            }
                        }
                        st.written += written as u64;
                        if written {
                            st.unsynced.push((first, end));
                        }
                    }
                    drop(room);
                    me.writes_pending.fetch_sub(1, Ordering::SeqCst);
                    me.writes_done.notify_waiters();
                };
                // The write goes to a blocking thread. A reader's own run is mostly driven by that
                // reader's task, which answers once this returns: woken now, the writing thread
                // took the CPU from it (the wakee preempts), and the reader was answered after
                // the write's system call. Started from a task queued behind the reader's own
                // (the worker's next-task slot: no other thread woken), it comes after the answer.
                // Read-ahead and fill runs end on tasks nobody is answered from, and a task in
                // between only cost them: their writes go straight to the thread.
                if matches!(kind, RunKind::Demand) && tokio::task::try_id().is_some() {
                    let rt = self.rt.clone();
                    self.rt.spawn(async move {
                        rt.spawn_blocking(write);
                    });
                } else {
                    self.rt.spawn_blocking(write);
                }
            }
            Err(e) => {
                {
                    let mut st = lock(&self.state);
                    for c in first..end {
                        st.inflight.remove(&c);
                    }
                }
                let mut h = lock(&self.health);
                let msg = e.report();
                if matches!(e.kind(), ErrorKind::OriginChanged | ErrorKind::Integrity) {
                    h.fatal.get_or_insert(msg);
                } else {
                    h.transient = Some(msg);
                }
            }
        }
        result
    }

    /// Room in `write_room` for the run `[first, end)` until its cache write ends. A reader's
    /// own fetch takes it only if it is free: readers never wait on the cache disk.
    async fn write_room(&self, first: u64, end: u64, kind: RunKind) -> Result<Option<OwnedSemaphorePermit>> {
        let total = room_kib(self.cfg.write_behind, u64::MAX) as u64;
        let kib = room_kib(self.chunk_range(end - 1).1 - first * self.chunk_size, total);
        if kind == RunKind::Demand {
            return Ok(self.write_room.clone().try_acquire_many_owned(kib).ok());
        }
        let permit = self.write_room.clone().acquire_many_owned(kib).await;
        permit.map(Some).map_err(|e| Error::with_source(ErrorKind::CacheIo, "write room closed", e))
    }

    async fn fetch_verified(&self, first: u64, end: u64, readahead: bool, fill: &Arc<Filling>, served: Arc<AtomicUsize>) -> Result<Run> {
        let slots = if readahead { &self.readahead_slots } else { &self.demand_slots };
        let _permit = slots.acquire().await.map_err(|e| Error::with_source(ErrorKind::CacheIo, "fetch slots closed", e))?;
        let offset = first * self.chunk_size;
        let len = self.chunk_range(end - 1).1 - offset;
        self.fetch_into(offset, len, fill).await?;
        // Checked as they arrived (none without a manifest).
        let (mut data, mut bad) = (fill.bytes(), fill.bad_chunks());
        if !bad.is_empty() {
            // One more try from the origin: a flipped bit in transit should not fail the read.
            // Into a buffer of its own: readers may hold bytes of the first.
            self.stats.count_verify_failure();
            tracing::warn!(image = %self.source.describe(), chunks = ?bad, "chunks failed verification; refetching once");
            let again = Filling::new(len as usize, self.chunk_check(first));
            self.fetch_into(offset, len, &again).await?;
            (data, bad) = (again.bytes(), again.bad_chunks());
            if !bad.is_empty() {
                self.stats.count_verify_failure();
                let msg = format!("{}: chunks {bad:?} do not match the manifest after a refetch", self.source.describe());
                tracing::error!("{msg}");
                lock(&self.health).fatal.get_or_insert(format!("{}: {msg}", ErrorKind::Integrity));
            }
        }
        Ok(Run::new(first, data, bad, served))
    }

    async fn fetch_into(&self, offset: u64, len: u64, fill: &Filling) -> Result<()> {
        let t = Instant::now();
        self.source.fetch_to(offset, len, &self.info, fill).await?;
        self.stats.count_fetch(len, t.elapsed());
        Ok(())
    }

    /// The manifest check of a run starting at chunk `first`, for a verified image.
    fn chunk_check(&self, first: u64) -> Option<ChunkCheck> {
        self.manifest.clone().map(|manifest| ChunkCheck { manifest, first, chunk_size: self.chunk_size as usize })
    }

    /// Writes the run's verified chunks to the cache file (blocking). False if nothing could be
    /// cached (full, or an I/O error): readers still get the bytes, the chunks just stay missing.
    fn write_good_chunks(&self, run: &Run, direct: bool) -> bool {
        let res = if run.bad.is_empty() {
            self.store.write_at(&run.data, run.first * self.chunk_size, direct)
        } else {
            // Rare path: write only the good chunks; a bad one must never reach the cache.
            let base = run.first * self.chunk_size;
            let end = run.first + run.data.len().div_ceil(self.chunk_size as usize) as u64;
            (run.first..end).filter(|c| !run.bad.contains(c)).try_fold(true, |ok, c| {
                let (a, b) = self.chunk_range(c);
                Ok(ok && self.store.write_at(&run.data[(a - base) as usize..(b - base) as usize], a, direct)?)
            })
        };
        match res {
            Ok(written) => {
                if written && lock(&self.health).cache.take().is_some() {
                    tracing::info!(dir = %self.store.dir().display(), "cache writes succeed again");
                }
                written
            }
            Err(e) => {
                self.stats.count_cache_write_error();
                let msg = format!("{}; misses are served without being cached", e.report());
                // Logged once per spell: on a full disk every write fails.
                if lock(&self.health).cache.replace(msg.clone()).is_none() {
                    tracing::warn!("{msg}");
                }
                false
            }
        }
    }

    /// Remembers a read-ahead run, just written around the page cache, for `copy_recent`. Kept
    /// at most `RECENT_TTL`, and at most twice the readahead window in all: the window is how
    /// far ahead of its reader a run lands.
    fn keep_recent(&self, run: Run) {
        let mut recent = lock(&self.recent);
        if run.read_whole() {
            return;
        }
        recent.push_back(Recent { run, at: Instant::now() });
        let limit = (2 * self.cfg.readahead_max).max(self.cfg.max_request) as usize;
        drop_expired(&mut recent);
        let mut total: usize = recent.iter().map(|r| r.run.data.len()).sum();
        while total > limit {
            let Some(old) = recent.pop_front() else { break };
            total -= old.run.data.len();
        }
    }

    fn stats_snapshot(&self) -> StatsSnapshot {
        let mut s = self.stats.snapshot();
        s.recent_bytes = lock(&self.recent).iter().map(|r| r.run.data.len() as u64).sum();
        s
    }

    /// Drops recent runs past `RECENT_TTL` (their reader went away).
    fn expire_recent(&self) {
        drop_expired(&mut lock(&self.recent));
    }

    /// Reads bytes whose chunks are present: from a recent run when memory holds them all (the
    /// cache file would go to the disk for them), else from the cache file.
    fn read_present(&self, dst: &mut [u8], at: u64) -> Result<()> {
        if self.copy_recent(at, dst) {
            return Ok(());
        }
        self.store.read_at(dst, at)
    }

    /// Fills `out` with the image's bytes at `offset` from recent runs, if they hold all of it.
    /// Callers ask only for cached chunks, and a recent run holds exactly the bytes written.
    fn copy_recent(&self, offset: u64, out: &mut [u8]) -> bool {
        let end = offset + out.len() as u64;
        let mut pieces = Vec::new();
        {
            let mut recent = lock(&self.recent);
            if recent.is_empty() {
                return false;
            }
            let mut at = offset;
            while at < end {
                let span = |r: &Recent| (r.run.first * self.chunk_size, r.run.first * self.chunk_size + r.run.data.len() as u64);
                let Some(i) = recent.iter().rposition(|r| span(r).0 <= at && at < span(r).1) else {
                    return false;
                };
                let (base, run_end) = span(&recent[i]);
                let upto = end.min(run_end);
                pieces.push((i, recent[i].run.data.slice((at - base) as usize..(upto - base) as usize), (at - offset) as usize));
                at = upto;
            }
            // Counted only once the whole range was found.
            for (i, bytes, _) in &pieces {
                recent[*i].run.count_served(bytes.len());
            }
            recent.retain(|r| !r.run.read_whole());
        }
        // The copies run outside the lock: other queues' readers need it too.
        for (_, bytes, at) in pieces {
            out[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        true
    }

    /// Tracks up to eight sequential streams; a read that continues one grows its window and
    /// returns the not-yet-requested range ahead of it.
    fn readahead_range(&self, offset: u64, end: u64) -> Option<(u64, u64)> {
        const STREAMS: usize = 8;
        if self.cfg.readahead_max == 0 {
            return None;
        }
        let slack = self.cfg.readahead_initial.max(self.chunk_size);
        let mut streams = lock(&self.streams);
        // A read belongs to a stream anywhere from just behind its next offset to just past what
        // was fetched ahead of it. The reach grows with the window and with the read's size: the
        // loop device sends several 1 MiB reads at once and they reach us slightly out of order,
        // which with a fixed 512 KiB reach started a new stream (and a small window) every time
        // one overtook another.
        let reach = |s: &Stream| slack.max(s.window).max(4 * (end - offset));
        let hit = streams.iter().position(|s| offset + reach(s) >= s.next && offset <= s.frontier.max(s.next) + reach(s));
        let Some(i) = hit else {
            if streams.len() == STREAMS {
                streams.pop();
            }
            streams.insert(0, Stream { next: end, window: 0, frontier: end, hits: 0 });
            return None;
        };
        let mut s = streams.remove(i);
        s.next = s.next.max(end);
        s.hits = s.hits.saturating_add(1);
        let large = end - offset >= LARGE_READ;
        if s.hits < 2 && !large {
            streams.insert(0, s);
            return None;
        }
        // Extend in whole windows once less than half a window is left ahead, so requests stay
        // large instead of one chunk per small read. At the full window, top up as soon as a
        // whole request fits: waiting for half a window let every request in flight end before
        // the next were claimed, and then all started together, leaving the origin idle for a
        // round trip each time.
        let ahead = s.frontier.saturating_sub(end);
        let top_up = s.window == self.cfg.readahead_max && ahead + self.cfg.max_request <= s.window;
        if s.window > 0 && ahead >= s.window / 2 && !top_up {
            streams.insert(0, s);
            return None;
        }
        let first = if large { LARGE_READ_WINDOWS * (end - offset) } else { 0 };
        s.window = (s.window * 2).max(first).clamp(self.cfg.readahead_initial, self.cfg.readahead_max);
        let from = s.frontier.max(end);
        let to = (end + s.window).min(self.info.size);
        s.frontier = s.frontier.max(to);
        streams.insert(0, s);
        (from < to).then_some((from, to))
    }

    /// Marks the chunks of `ranges` missing again after the sync that was to make them durable
    /// failed with `e`: they are fetched again rather than read from data the disk may not hold.
    fn forget(&self, ranges: &[(u64, u64)], e: &Error) {
        let mut n = 0;
        {
            let mut st = lock(&self.state);
            for c in ranges.iter().flat_map(|&(a, b)| a..b) {
                if st.present.get(c) {
                    st.present.clear(c);
                    n += 1;
                }
            }
        }
        self.store.release(n * self.chunk_size);
        let msg = format!("{}; {n} chunks written since the last sync will be fetched again", e.report());
        tracing::warn!("{msg}");
        lock(&self.health).cache = Some(msg);
    }

    async fn flush(self: Arc<Self>) -> Result<()> {
        // Held by the blocking work itself: a flush dropped while it runs still keeps the next out.
        let one = self.flushing.clone().lock_owned().await;
        let (snapshot, written) = {
            let mut st = lock(&self.state);
            ((st.written > st.synced).then(|| (st.present.clone(), std::mem::take(&mut st.unsynced))), st.written)
        };
        let me = self.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<()> {
            let _one = one;
            if let Some((bits, unsynced)) = &snapshot {
                if let Err(e) = me.store.persist(bits) {
                    me.forget(unsynced, &e);
                    return Err(e);
                }
            }
            let stats = serde_json::to_vec_pretty(&me.stats_snapshot()).unwrap_or_default();
            me.store.write_stats(&stats).map(drop)
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::CacheIo, "flush task", e))?;
        if res.is_ok() {
            let mut st = lock(&self.state);
            st.synced = st.synced.max(written);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{FakeSource, Fault};

    /// 4 KiB chunks, 64 KiB requests, a window of at most 256 KiB starting at `first_window`.
    fn small_config(dir: &std::path::Path, first_window: u64) -> ImageConfig {
        let mut cfg = ImageConfig::new(dir);
        cfg.chunk_size = 4096;
        cfg.max_request = 64 << 10;
        cfg.readahead_initial = first_window;
        cfg.readahead_max = 256 << 10;
        cfg.startup_misses = 0;
        cfg
    }

    /// At the full window, read-ahead is topped up a request at a time as the reader moves on,
    /// not only once half the window is left: the requests in flight then end at different
    /// times and the next ones are already claimed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_window_is_topped_up_a_request_at_a_time() {
        let src = Arc::new(FakeSource::new(vec![7u8; 1 << 20]));
        let dir = tempfile::tempdir().expect("tempdir");
        let img = LazyImage::open(src, small_config(dir.path(), 256 << 10)).await.expect("open");
        let mut claimed = Vec::new();
        for off in (0..112u64 << 10).step_by(16 << 10) {
            img.read(off, 16 << 10).await.expect("read");
            claimed.push(img.stats().readahead_chunks);
        }
        // The third read starts the stream's window: 48..304 KiB (64 chunks). When the reader
        // reaches 112 KiB a whole request fits again: 304..368 KiB (16 chunks).
        assert_eq!(claimed, [0, 0, 64, 64, 64, 64, 80]);
    }

    /// Reads as large as the kernel's own read-ahead sends open the whole window at the second
    /// read (see `LARGE_READ`); small reads still need two before a first, small window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_reads_open_a_wide_window_at_once() {
        let src = Arc::new(FakeSource::new(vec![3u8; 64 << 20]));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = ImageConfig::new(dir.path());
        cfg.startup_misses = 0;
        cfg.readahead_max = 16 << 20;
        let img = LazyImage::open(src, cfg.clone()).await.expect("open");
        let chunks = |bytes: u64| bytes / cfg.chunk_size;
        img.read(0, 1 << 20).await.expect("read");
        assert_eq!(img.stats().readahead_chunks, 0, "one read is not yet a stream");
        img.read(1 << 20, 1 << 20).await.expect("read");
        assert_eq!(img.stats().readahead_chunks, chunks(16 << 20), "the whole window at the second large read");

        img.read(40 << 20, 16 << 10).await.expect("read");
        img.read((40 << 20) + (16 << 10), 16 << 10).await.expect("read");
        assert_eq!(img.stats().readahead_chunks, chunks(16 << 20), "two small reads start nothing");
        img.read((40 << 20) + (32 << 10), 16 << 10).await.expect("read");
        assert_eq!(img.stats().readahead_chunks, chunks((16 << 20) + cfg.readahead_initial), "the third, a first window");
    }

    /// A 1 MiB image whose fetches hand their bytes over in 16 pieces 40 ms apart, fetched in
    /// one request; with `verified`, checked against a manifest.
    async fn trickling_image(dir: &std::path::Path, verified: bool) -> (LazyImage, Arc<FakeSource>, Vec<u8>) {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
        let src = Arc::new(FakeSource::new(data.clone()));
        let mut cfg = small_config(dir, 64 << 10);
        cfg.max_request = 1 << 20;
        cfg.readahead_max = 0;
        if verified {
            cfg.manifest = Some(Manifest::build(&data[..], 4096, |_| {}).expect("manifest"));
        }
        let img = LazyImage::open(src.clone(), cfg).await.expect("open");
        src.inject(Fault::Trickle { piece: 64 << 10, pause: Duration::from_millis(40) });
        (img, src, data)
    }

    fn spawn_read(img: &LazyImage, offset: u64, len: u64) -> tokio::task::JoinHandle<Result<Bytes>> {
        let img = img.clone();
        tokio::spawn(async move { img.read(offset, len).await })
    }

    /// A reader of the front of a run another read is fetching gets its bytes when they arrive,
    /// not when the whole run has: the small read ends before the run's fetch does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_take_the_front_of_a_run_before_its_end_arrives() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (img, src, data) = trickling_image(dir.path(), false).await;
        let whole = spawn_read(&img, 0, 1 << 20);
        // The whole read claims the run; this one then finds chunk 1 in flight.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let front = img.read(4096, 8192).await.expect("front read");
        assert_eq!(&front[..], &data[4096..12288]);
        assert_eq!(img.stats().origin_requests, 0, "the small read waited for the whole run");
        let got = whole.await.expect("join").expect("whole read");
        assert!(got[..] == data[..], "whole read differs");
        assert_eq!(src.fetch_count(), 1, "one run served both reads");
    }

    /// The same for a verified image, chunk by checked chunk: the front comes early, and a
    /// reader of a chunk that arrived corrupt gets the refetched bytes, never the bad ones.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_of_a_verified_image_take_checked_chunks_as_they_arrive() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (img, src, data) = trickling_image(dir.path(), true).await;
        src.inject(Fault::CorruptAt { offset: 600_000, times: 1 });
        let whole = spawn_read(&img, 0, 1 << 20);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let bad = spawn_read(&img, 600_000, 100);
        let front = img.read(4096, 8192).await.expect("front read");
        assert_eq!(&front[..], &data[4096..12288]);
        assert_eq!(img.stats().origin_requests, 0, "the small read waited for the whole run");
        let got = bad.await.expect("join").expect("read of the corrupt chunk");
        assert_eq!(&got[..], &data[600_000..600_100], "bytes that failed their check were served");
        let got = whole.await.expect("join").expect("whole read");
        assert!(got[..] == data[..], "whole read differs");
        assert_eq!(src.fetch_count(), 2, "the run, and its refetch after the corrupt chunk");
    }

    /// A sequential reader mostly copies read-ahead runs before their cache write ends; runs it
    /// read whole must not be kept in memory for it afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_read_while_in_flight_are_not_kept() {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let src = Arc::new(FakeSource::new(data.clone()));
        src.inject(Fault::Delay(Duration::from_millis(3)));
        let dir = tempfile::tempdir().expect("tempdir");
        let img = LazyImage::open(src, small_config(dir.path(), 64 << 10)).await.expect("open");
        for off in (0..data.len()).step_by(16 << 10) {
            let got = img.read(off as u64, 16 << 10).await.expect("read");
            assert_eq!(&got[..], &data[off..off + (16 << 10)]);
        }
        img.settle().await;
        let kept: Vec<(u64, usize)> = lock(&img.inner.recent).iter().map(|r| (r.run.first, r.run.served.load(Ordering::Relaxed))).collect();
        assert!(img.stats().readahead_chunks > 0, "the reads ran ahead");
        assert!(kept.is_empty(), "runs the reader had read whole are still held (first chunk, bytes read): {kept:?}");
    }

    /// Chunks written since the last durable sync are marked missing when a sync fails, and
    /// fetched again: their data may never reach the disk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_of_a_failed_sync_are_fetched_again() {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        let src = Arc::new(FakeSource::new(data.clone()));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = small_config(dir.path(), 64 << 10);
        cfg.readahead_max = 0;
        cfg.flush_interval = Duration::from_secs(3600);
        let img = LazyImage::open(src.clone(), cfg.clone()).await.expect("open");
        img.read(0, 64 << 10).await.expect("read");
        img.settle().await;
        img.flush().await.expect("first flush");
        img.read(512 << 10, 64 << 10).await.expect("read");
        img.settle().await;
        assert_eq!(img.fill().0, 32);

        img.inner.store.failing_syncs.store(1, Ordering::SeqCst);
        assert!(img.flush().await.is_err());
        assert_eq!(img.fill().0, 16, "the chunks synced before stay, the others are missing again");
        let c = img.condition();
        assert!(c.abnormal && c.message.contains("fetched again"), "{}", c.message);
        let before = src.bytes_count();
        assert_eq!(&img.read(512 << 10, 64 << 10).await.expect("read")[..], &data[512 << 10..576 << 10]);
        assert_eq!(src.bytes_count() - before, 64 << 10, "fetched again");
        img.settle().await;
        assert!(!img.condition().abnormal, "a cache write that works again clears the condition");
        img.close().await.expect("close");

        let img = LazyImage::open(src, cfg).await.expect("reopen");
        assert_eq!(img.fill().0, 32);
    }
}
