//! A writable layer over a read-only view: written blocks land in a local sparse file, every
//! other block reads through to the view below. The view below never sees a write, so its cache
//! and integrity checks stay as they are and other volumes of the same image read the original.
//!
//! The layer is two files in its own directory, plus `layer.json` naming the image size:
//! - `data`, sparse: byte `o` of the device at `o`;
//! - `map`, two bits per 4 KiB block (below / data / zeros), mapped shared, so a block's state
//!   is in the page cache the moment it is set.
//!
//! A block device's driver may copy a rewrite (blocks already holding data) straight into
//! `data`, mapped shared (`write_place`): no copy through a buffer and no write(2).
//!
//! A block's bytes are written before its state says so, so a daemon killed at any point leaves
//! every acknowledged write readable (the page cache outlives the process). What reaches the
//! disk is what a flush wrote: a power loss drops the writes since the last flush, as a disk
//! with a volatile write cache does (the devices say they have one, so filesystems flush).

use crate::error::{Error, ErrorKind, Result};
use crate::image::{Condition, ReadPlan};
use crate::stats::StatsSnapshot;
use crate::view::{BlockView, View};
use async_trait::async_trait;
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// The layer's unit: a write smaller than this copies the rest of its block first.
pub const BLOCK: u64 = 4096;
const META: &str = "layer.json";
const LAYER_VERSION: u32 = 1;
/// Blocks per map word (two bits each).
const PER_WORD: u64 = 32;
/// Partial-block writes of one stripe are serialised: two of them in one block must not both
/// copy the block from below and then overwrite each other's bytes.
const STRIPES: u64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not written: the view below has the block.
    Below,
    /// The layer's `data` file has the block.
    Data,
    /// Zeroed (discarded or write-zeroed): reads as zeros, holds no space.
    Zero,
}

impl State {
    fn bits(self) -> u64 {
        match self {
            State::Below => 0,
            State::Data => 1,
            State::Zero => 2,
        }
    }

    fn of(bits: u64) -> State {
        match bits & 3 {
            1 => State::Data,
            2 => State::Zero,
            _ => State::Below,
        }
    }
}

/// A shared read-write mapping of a whole file.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping lives as long as the `Mapping`; what is stored through it is the users' to
// synchronise (the map's words are atomics; the data file's bytes are a device's, ordered by
// its requests).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn open(file: &File, len: u64) -> std::io::Result<Mapping> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(len.max(1)).map_err(|_| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh shared mapping of a file at least `len` bytes long (the caller sized
        // it); the result is checked.
        let ptr =
            unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The block states, a shared mapping of the `map` file.
struct Map {
    mapping: Mapping,
    words: usize,
}

impl Map {
    fn open(file: &File, blocks: u64) -> std::io::Result<Map> {
        let words = blocks.div_ceil(PER_WORD) as usize;
        Ok(Map { mapping: Mapping::open(file, (words * 8).max(8) as u64)?, words })
    }

    fn word(&self, block: u64) -> &AtomicU64 {
        let w = (block / PER_WORD) as usize;
        debug_assert!(w < self.words);
        // SAFETY: callers pass blocks of the device, whose words are all inside the mapping,
        // which is page-aligned (so 8-byte aligned) and lives as long as `self`.
        unsafe { &*self.mapping.ptr.cast::<AtomicU64>().add(w) }
    }

    fn get(&self, block: u64) -> State {
        State::of(self.word(block).load(Ordering::Acquire) >> ((block % PER_WORD) * 2))
    }

    /// Sets a block's state; returns the one it had.
    fn set(&self, block: u64, state: State) -> State {
        let shift = (block % PER_WORD) * 2;
        let old = self
            .word(block)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| Some((w & !(3 << shift)) | (state.bits() << shift)))
            .unwrap_or_else(|w| w);
        State::of(old >> shift)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LayerMeta {
    version: u32,
    size: u64,
    block: u64,
}

/// A run of blocks in one state, as byte offsets of the device clipped to a request.
struct Run {
    state: State,
    start: u64,
    end: u64,
}

/// The writable layer over `below` (see the module comment).
pub struct CowView {
    below: View,
    dir: PathBuf,
    size: u64,
    data: File,
    map_file: File,
    map: Map,
    /// `data` mapped, where a block device's driver copies rewrites itself (`write_place`);
    /// `None` if it could not be mapped (then every write goes through `write`).
    placed: Option<Mapping>,
    /// Blocks in the `Data` state, and the most there may be.
    used: AtomicI64,
    limit: u64,
    stripes: Vec<tokio::sync::Mutex<()>>,
}

impl CowView {
    /// The layer in `dir` over `below`: created empty, or as a previous process left it (the
    /// same image: a layer made over another size is refused). At most `limit_bytes` of blocks
    /// hold data; a write needing more fails with `NoSpace`.
    pub fn open(below: View, dir: &Path, limit_bytes: u64) -> Result<Arc<CowView>> {
        let size = below.size();
        if !size.is_multiple_of(BLOCK) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("a writable layer needs an image whose size is a multiple of {BLOCK} bytes; this one has {size}"),
            ));
        }
        let io = |what: &str, e| Error::cache_io(format!("{what} the writable layer in {}", dir.display()), e);
        std::fs::create_dir_all(dir).map_err(|e| io("creating", e))?;
        let meta_path = dir.join(META);
        let blocks = size / BLOCK;
        let map_len = (blocks.div_ceil(PER_WORD) * 8).max(8);
        let fresh = match std::fs::read(&meta_path) {
            Ok(bytes) => {
                let meta: LayerMeta = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::with_source(ErrorKind::Integrity, format!("reading {}", meta_path.display()), e))?;
                if meta.version != LAYER_VERSION || meta.block != BLOCK || meta.size != size {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        format!(
                            "the writable layer in {} was made for a {}-byte image (layer version {}), not this {size}-byte one",
                            dir.display(),
                            meta.size,
                            meta.version
                        ),
                    ));
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(io("reading", e)),
        };
        let open = |name: &str| {
            OpenOptions::new().read(true).write(true).create(true).truncate(fresh).open(dir.join(name)).map_err(|e| io("opening", e))
        };
        let data = open("data")?;
        let map_file = open("map")?;
        if fresh {
            data.set_len(size).map_err(|e| io("sizing", e))?;
            map_file.set_len(map_len).map_err(|e| io("sizing", e))?;
        } else {
            let (d, m) = (data.metadata().map_err(|e| io("reading", e))?.len(), map_file.metadata().map_err(|e| io("reading", e))?.len());
            if d != size || m != map_len {
                return Err(Error::new(
                    ErrorKind::Integrity,
                    format!(
                        "the writable layer in {} is damaged: its files are {d} and {m} bytes, not {size} and {map_len}",
                        dir.display()
                    ),
                ));
            }
        }
        let map = Map::open(&map_file, blocks).map_err(|e| io("mapping", e))?;
        if fresh {
            // Written last: a layer without it is one whose creation did not finish.
            let meta = serde_json::to_vec(&LayerMeta { version: LAYER_VERSION, size, block: BLOCK })
                .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "encoding the layer's record", e))?;
            std::fs::write(&meta_path, meta).map_err(|e| io("recording", e))?;
        }
        let used = (0..blocks).filter(|&b| map.get(b) == State::Data).count() as i64;
        let placed =
            Mapping::open(&data, size).inspect_err(|e| tracing::debug!(error = %e, "writes to the layer go through write(2)")).ok();
        Ok(Arc::new(CowView {
            below,
            dir: dir.to_path_buf(),
            size,
            data,
            map_file,
            map,
            placed,
            used: AtomicI64::new(used),
            limit: limit_bytes / BLOCK,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }))
    }

    /// Bytes of the device the layer holds data for.
    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::Relaxed).max(0) as u64 * BLOCK
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The runs of block states covering `[offset, end)`.
    fn runs(&self, offset: u64, end: u64) -> Vec<Run> {
        let mut runs: Vec<Run> = Vec::new();
        let mut b = offset / BLOCK;
        while b * BLOCK < end {
            let state = self.map.get(b);
            let (start, stop) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(end));
            match runs.last_mut() {
                Some(r) if r.state == state => r.end = stop,
                _ => runs.push(Run { state, start, end: stop }),
            }
            b += 1;
        }
        runs
    }

    /// The one state of every block in `[offset, end)`, if they share one.
    fn uniform(&self, offset: u64, end: u64) -> Option<State> {
        let first = self.map.get(offset / BLOCK);
        let mut b = offset / BLOCK + 1;
        while b * BLOCK < end {
            if self.map.get(b) != first {
                return None;
            }
            b += 1;
        }
        Some(first)
    }

    fn read_data(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.data
            .read_exact_at(dst, offset)
            .map_err(|e| Error::cache_io(format!("reading the writable layer in {}", self.dir.display()), e))
    }

    fn write_data(&self, offset: u64, src: &[u8]) -> Result<()> {
        self.data.write_all_at(src, offset).map_err(|e| {
            let kind = if e.raw_os_error() == Some(libc::ENOSPC) { ErrorKind::NoSpace } else { ErrorKind::CacheIo };
            Error::with_source(kind, format!("writing the writable layer in {}", self.dir.display()), e)
        })
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::new(ErrorKind::InvalidInput, format!("{len} bytes at {offset} reach past the {}-byte device", self.size)));
        }
        Ok(())
    }

    /// Takes room for `blocks` more blocks of data, or fails with `NoSpace`.
    fn reserve(&self, blocks: u64) -> Result<()> {
        let before = self.used.fetch_add(blocks as i64, Ordering::AcqRel);
        if (before + blocks as i64) as u64 > self.limit && blocks > 0 {
            self.used.fetch_sub(blocks as i64, Ordering::AcqRel);
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("the writable layer is full: it may hold {} bytes of changed blocks", self.limit * BLOCK),
            ));
        }
        Ok(())
    }

    /// Marks `[first, last]` as holding data; returns how many were not data before. Blocks
    /// already marked are only read: a rewrite leaves the map's pages clean.
    fn mark_data(&self, first: u64, last: u64) -> u64 {
        (first..=last).filter(|&b| self.map.get(b) != State::Data && self.map.set(b, State::Data) != State::Data).count() as u64
    }

    /// The blocks of `[offset, offset + len)` a write only partly covers (head, tail).
    fn partial_edges(offset: u64, len: u64) -> Vec<u64> {
        let end = offset + len;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let mut edges = Vec::new();
        if !offset.is_multiple_of(BLOCK) || (first == last && !end.is_multiple_of(BLOCK)) {
            edges.push(first);
        }
        if last != first && !end.is_multiple_of(BLOCK) {
            edges.push(last);
        }
        edges
    }

    /// Writes what needs no copy from below: the whole blocks, and the partial ones that already
    /// hold data. Returns the partial blocks left (which need `fill_partial`).
    fn write_direct(&self, offset: u64, src: &[u8]) -> Result<Vec<u64>> {
        let end = offset + src.len() as u64;
        let (whole_start, whole_end) = (offset.next_multiple_of(BLOCK), end / BLOCK * BLOCK);
        if whole_end > whole_start {
            let (first, last) = (whole_start / BLOCK, whole_end / BLOCK - 1);
            let new = (first..=last).filter(|&b| self.map.get(b) != State::Data).count() as u64;
            self.reserve(new)?;
            if let Err(e) = self.write_data(whole_start, &src[(whole_start - offset) as usize..(whole_end - offset) as usize]) {
                self.used.fetch_sub(new as i64, Ordering::AcqRel);
                return Err(e);
            }
            // Blocks that became data meanwhile (another write) were reserved twice.
            let counted = self.mark_data(first, last);
            self.used.fetch_add(counted as i64 - new as i64, Ordering::AcqRel);
        }
        let mut left = Vec::new();
        for b in Self::partial_edges(offset, src.len() as u64) {
            if self.map.get(b) == State::Data {
                let (s, e) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(end));
                self.write_data(s, &src[(s - offset) as usize..(e - offset) as usize])?;
            } else {
                left.push(b);
            }
        }
        Ok(left)
    }

    /// Writes the part of `src` (at `offset`) inside block `b`, which does not hold data yet:
    /// the block is copied from below (or zeros) first, in one write.
    async fn fill_partial(&self, b: u64, offset: u64, src: &[u8]) -> Result<()> {
        let _g = self.stripes[(b % STRIPES) as usize].lock().await;
        let (s, e) = ((b * BLOCK).max(offset), ((b + 1) * BLOCK).min(offset + src.len() as u64));
        let part = &src[(s - offset) as usize..(e - offset) as usize];
        match self.map.get(b) {
            State::Data => self.write_data(s, part),
            state => {
                self.reserve(1)?;
                let mut block = vec![0u8; BLOCK as usize];
                if state == State::Below {
                    if let Err(e) = self.below.read_into(b * BLOCK, &mut block).await {
                        self.used.fetch_sub(1, Ordering::AcqRel);
                        return Err(e);
                    }
                }
                block[(s - b * BLOCK) as usize..(e - b * BLOCK) as usize].copy_from_slice(part);
                if let Err(e) = self.write_data(b * BLOCK, &block) {
                    self.used.fetch_sub(1, Ordering::AcqRel);
                    return Err(e);
                }
                if self.map.set(b, State::Data) == State::Data {
                    self.used.fetch_sub(1, Ordering::AcqRel);
                }
                Ok(())
            }
        }
    }

    /// Reads runs of mixed states, waiting on below for its blocks when `wait`; `None` when a
    /// block below is not cached and `wait` is false.
    async fn read_runs(&self, offset: u64, buf: &mut [u8], wait: bool) -> Result<Option<usize>> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(offset)) as usize;
        for run in self.runs(offset, offset + n as u64) {
            let dst = &mut buf[(run.start - offset) as usize..(run.end - offset) as usize];
            match run.state {
                State::Zero => dst.fill(0),
                State::Data => self.read_data(run.start, dst)?,
                State::Below if wait => {
                    let got = self.below.read_into(run.start, dst).await?;
                    dst[got..].fill(0);
                }
                State::Below => match self.below.read_cached_into(run.start, dst)? {
                    Some(got) => dst[got..].fill(0),
                    None => return Ok(None),
                },
            }
        }
        Ok(Some(n))
    }
}

#[async_trait]
impl BlockView for CowView {
    fn size(&self) -> u64 {
        self.size
    }

    fn chunk_size(&self) -> u64 {
        self.below.chunk_size()
    }

    fn plan_read(&self, offset: u64, buf: &mut [u8]) -> ReadPlan<'_> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(offset)) as usize;
        if n == 0 {
            return ReadPlan::Copied(0);
        }
        match self.uniform(offset, offset + n as u64) {
            Some(State::Below) => self.below.plan_read(offset, buf),
            Some(State::Data) => ReadPlan::File { file: self.data.as_fd(), direct: None, offset, len: n },
            Some(State::Zero) => {
                buf[..n].fill(0);
                ReadPlan::Copied(n)
            }
            None => ReadPlan::Miss,
        }
    }

    fn read_cached_into(&self, offset: u64, buf: &mut [u8]) -> Result<Option<usize>> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(offset));
        if n > 0 && self.uniform(offset, offset + n) == Some(State::Below) {
            return self.below.read_cached_into(offset, buf);
        }
        // Nothing below is awaited, so the future is ready at its first poll.
        futures::executor::block_on(self.read_runs(offset, buf, false))
    }

    fn direct_refused(&self) {
        self.below.direct_refused()
    }

    async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let n = (buf.len() as u64).min(self.size.saturating_sub(offset));
        if n > 0 && self.uniform(offset, offset + n) == Some(State::Below) {
            return self.below.read_into(offset, buf).await;
        }
        Ok(self.read_runs(offset, buf, true).await?.unwrap_or(0))
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        let n = len.min(self.size.saturating_sub(offset));
        let mut buf = vec![0u8; n as usize];
        let got = self.read_into(offset, &mut buf).await?;
        buf.truncate(got);
        Ok(buf.into())
    }

    fn condition(&self) -> Condition {
        self.below.condition()
    }

    fn stats(&self) -> StatsSnapshot {
        self.below.stats()
    }

    async fn close(&self) -> Result<()> {
        self.flush().await?;
        self.below.close().await
    }

    fn writable(&self) -> bool {
        true
    }

    fn write_now(&self, offset: u64, src: &[u8]) -> Option<Result<()>> {
        if src.is_empty() {
            return Some(Ok(()));
        }
        if let Err(e) = self.check_range(offset, src.len() as u64) {
            return Some(Err(e));
        }
        // Only when no partial block needs a copy from below.
        if Self::partial_edges(offset, src.len() as u64).iter().any(|&b| self.map.get(b) != State::Data) {
            return None;
        }
        match self.write_direct(offset, src) {
            Ok(left) if left.is_empty() => Some(Ok(())),
            // A block changed state meanwhile (a concurrent zeroing): the async path finishes it.
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    }

    fn write_place(&self, offset: u64, len: usize) -> Option<NonNull<u8>> {
        let mapping = self.placed.as_ref()?;
        let end = offset.checked_add(len as u64).filter(|&end| len > 0 && end <= self.size)?;
        // Only blocks holding data: a block still below needs its other bytes copied first.
        if self.uniform(offset, end) != Some(State::Data) {
            return None;
        }
        // SAFETY: `offset + len <= size`, the mapping's length.
        NonNull::new(unsafe { mapping.ptr.add(offset as usize) })
    }

    fn placed(&self, offset: u64, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(offset, len as u64)?;
        // A block zeroed while the driver copied into it holds data again, as after a `write`
        // that raced a zeroing (either order is what the device may do with the two).
        let counted = self.mark_data(offset / BLOCK, (offset + len as u64 - 1) / BLOCK);
        self.used.fetch_add(counted as i64, Ordering::AcqRel);
        Ok(())
    }

    async fn write(&self, offset: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.check_range(offset, src.len() as u64)?;
        for b in self.write_direct(offset, src)? {
            self.fill_partial(b, offset, src).await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(offset, len)?;
        let end = offset + len;
        let (first, last) = (offset.next_multiple_of(BLOCK), end / BLOCK * BLOCK);
        if first >= last {
            return self.write(offset, &vec![0u8; len as usize]).await;
        }
        if offset < first {
            self.write(offset, &vec![0u8; (first - offset) as usize]).await?;
        }
        if end > last {
            self.write(last, &vec![0u8; (end - last) as usize]).await?;
        }
        // The space is freed before the blocks say zeros: a kill in between leaves data blocks
        // that read as zeros, which is what was asked.
        punch_hole(&self.data, first, last - first)
            .map_err(|e| Error::cache_io(format!("freeing blocks of the writable layer in {}", self.dir.display()), e))?;
        let freed = (first / BLOCK..last / BLOCK).filter(|&b| self.map.set(b, State::Zero) == State::Data).count();
        self.used.fetch_sub(freed as i64, Ordering::AcqRel);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let err = |e| Error::cache_io(format!("flushing the writable layer in {}", self.dir.display()), e);
        let (data, map) = (self.data.try_clone().map_err(err)?, self.map_file.try_clone().map_err(err)?);
        // fsync writes the map's pages dirtied through the mapping too.
        let flushed = tokio::task::spawn_blocking(move || data.sync_data().and_then(|()| map.sync_data())).await;
        flushed.map_err(|e| Error::new(ErrorKind::CacheIo, format!("flushing the writable layer: {e}")))?.map_err(err)
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as libc::off_t, len as libc::off_t)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
