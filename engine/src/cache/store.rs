use super::Bitmap;
use crate::error::{Error, ErrorKind, Result};
use crate::source::ImageInfo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub const CACHE_FORMAT_VERSION: u32 = 1;
/// The image's bytes at their own offsets, sparse where chunks are missing.
pub const DATA_FILE: &str = "data";
/// Memory address, file offset and length must all be multiples of this for a read through
/// `data_direct_fd` (the largest logical block size in common use).
pub const DIRECT_ALIGN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheHeader {
    pub format_version: u32,
    pub url: String,
    pub info: ImageInfo,
    pub chunk_size: u64,
    pub manifest_digest: Option<String>,
}

impl CacheHeader {
    /// Old bytes may be served for this header only if they are provably the same image: same
    /// size and chunking, and either the same pinned manifest or the same origin validator.
    pub fn can_reuse(&self, old: &CacheHeader) -> bool {
        let same_shape = self.format_version == old.format_version && self.info.size == old.info.size && self.chunk_size == old.chunk_size;
        let same_pin = self.manifest_digest.is_some() && self.manifest_digest == old.manifest_digest;
        let same_validator =
            self.info.has_validator() && self.info.etag == old.info.etag && self.info.last_modified == old.info.last_modified;
        same_shape && (same_pin || same_validator)
    }

    pub fn chunks(&self) -> u64 {
        self.info.size.div_ceil(self.chunk_size)
    }
}

/// The cache key: the pinned digest's hex if any, else a hash of the URL.
pub fn cache_key(url: &str, manifest_digest: Option<&str>) -> String {
    match manifest_digest.and_then(|d| d.strip_prefix("sha256:")) {
        Some(hex) => format!("d-{}", &hex[..32.min(hex.len())]),
        None => format!("u-{}", &hex::encode(Sha256::digest(url.as_bytes()))[..32]),
    }
}

pub struct CacheStore {
    dir: PathBuf,
    header: CacheHeader,
    data: File,
    /// The data file opened with `O_DIRECT`: for callers' small aligned reads (`data_direct_fd`),
    /// and for the writes the engine asks to go around the page cache (`write_at`). On ext4 a
    /// direct write into a hole holds the inode lock that direct reads share, so the engine reads
    /// directly only while no write runs. `None` where the filesystem refuses `O_DIRECT`.
    data_direct: Option<File>,
    direct_ok: AtomicBool,
    bitmap_file: File,
    _lock: File,
    /// Bytes this image may occupy in the cache, from the node limit minus other images.
    budget: Option<u64>,
    used: AtomicU64,
    /// Syncs left to fail, for tests of what a failed sync must undo.
    #[cfg(test)]
    pub(crate) failing_syncs: std::sync::atomic::AtomicU32,
}

fn io(dir: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let ctx = format!("{} in {}", what, dir.display());
    move |e| {
        let kind = if e.raw_os_error() == Some(libc::EWOULDBLOCK) { ErrorKind::CacheBusy } else { ErrorKind::CacheIo };
        Error::with_source(kind, ctx, e)
    }
}

/// Takes an exclusive, non-blocking advisory lock on `f`.
pub(super) fn try_lock(f: &File) -> std::io::Result<()> {
    // SAFETY: flock on a valid, owned file descriptor has no memory-safety preconditions.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub(super) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_data()
    });
    if let Err(e) = written {
        // A part written on a full disk holds space the next write needs.
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// The filesystem (or the user's quota on it) has no room left.
fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

impl CacheStore {
    /// Opens (or creates, or resets) the cache of one image under `root`. Fails with `CacheBusy`
    /// if another process has it open. Returns the store and the bitmap of chunks present.
    pub fn open(root: &Path, key: &str, header: CacheHeader, budget: Option<u64>) -> Result<(Self, Bitmap)> {
        let dir = root.join(key);
        std::fs::create_dir_all(&dir).map_err(io(&dir, "creating the cache directory"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .map_err(io(&dir, "opening the lock file"))?;
        try_lock(&lock).map_err(io(&dir, "locking the cache"))?;
        // The lock file's mtime records last use, for eviction order.
        lock.set_len(0).map_err(io(&dir, "touching the lock file"))?;
        let bitmap_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join("bitmap"))
            .map_err(io(&dir, "opening the bitmap file"))?;

        let old: Option<CacheHeader> = std::fs::read(dir.join("header.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        let chunks = header.chunks();
        let reused = match &old {
            Some(old) if header.can_reuse(old) => {
                let mut bytes = vec![0u8; Bitmap::byte_len(chunks)];
                let ok = bitmap_file.read_exact_at(&mut bytes, 0).is_ok();
                if ok {
                    Bitmap::from_bytes(bytes, chunks)
                } else {
                    None
                }
            }
            _ => None,
        };
        let bitmap = match reused {
            Some(b) => {
                if old.as_ref() != Some(&header) {
                    // Same image under a new URL (e.g. re-signed): record the new URL.
                    write_atomic(&dir, "header.json", &serde_json::to_vec_pretty(&header).unwrap_or_default())
                        .map_err(io(&dir, "writing the header"))?;
                }
                b
            }
            None => {
                if old.is_some() {
                    tracing::info!(dir = %dir.display(), "cache belongs to another image version; resetting it");
                }
                // Order matters for crash safety: empty bitmap first, then data, then header.
                let b = Bitmap::new(chunks);
                bitmap_file.set_len(0).map_err(io(&dir, "resetting the bitmap"))?;
                bitmap_file.write_all_at(b.as_bytes(), 0).map_err(io(&dir, "resetting the bitmap"))?;
                bitmap_file.sync_data().map_err(io(&dir, "syncing the bitmap"))?;
                // A new file, not a truncated one: a loop device may still read the old bytes
                // directly (see `LazyImage::complete_data_file`) and must keep them.
                if let Err(e) = std::fs::remove_file(dir.join(DATA_FILE)) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return Err(io(&dir, "removing the old data file")(e));
                    }
                }
                write_atomic(&dir, "header.json", &serde_json::to_vec_pretty(&header).unwrap_or_default())
                    .map_err(io(&dir, "writing the header"))?;
                b
            }
        };
        let data = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(dir.join(DATA_FILE))
            .map_err(io(&dir, "opening the data file"))?;
        data.set_len(header.info.size).map_err(io(&dir, "sizing the data file"))?;
        let data_direct = OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(dir.join(DATA_FILE)).ok();
        let used = AtomicU64::new(bitmap.count_ones() * header.chunk_size);
        let direct_ok = AtomicBool::new(data_direct.is_some());
        let store = CacheStore {
            dir,
            header,
            data,
            data_direct,
            direct_ok,
            bitmap_file,
            _lock: lock,
            budget,
            used,
            #[cfg(test)]
            failing_syncs: Default::default(),
        };
        Ok((store, bitmap))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn header(&self) -> &CacheHeader {
        &self.header
    }

    pub fn data_path(&self) -> PathBuf {
        self.dir.join(DATA_FILE)
    }

    /// The data file, for callers that read cached ranges with their own I/O (io_uring).
    pub fn data_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.data.as_fd()
    }

    /// The data file opened with `O_DIRECT`, while direct I/O works on this filesystem. Reads
    /// through it must be aligned to `DIRECT_ALIGN` (address, offset, length).
    pub fn data_direct_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.data_direct.as_ref().filter(|_| self.direct_ok.load(Ordering::Relaxed)).map(|f| f.as_fd())
    }

    /// For a caller whose direct read was refused (EINVAL): direct I/O is off from now on.
    pub fn direct_refused(&self) {
        self.direct_ok.store(false, Ordering::Relaxed);
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.data.read_exact_at(buf, offset).map_err(|e| self.read_error(buf.len(), offset, e))
    }

    fn read_error(&self, len: usize, offset: u64, e: std::io::Error) -> Error {
        Error::cache_io(format!("reading {len} bytes at {offset} from {}", self.dir.display()), e)
    }

    /// `read_at` only if every page is in the page cache (`RWF_NOWAIT`): `false` when the read
    /// would wait on the disk (the kernel starts reading the pages meanwhile).
    pub fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        use std::os::fd::AsRawFd;
        let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: one iovec over `buf`, which outlives the call.
        let n = unsafe { libc::preadv2(self.data.as_raw_fd(), &iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) => Ok(false),
                _ => Err(self.read_error(buf.len(), offset, e)),
            };
        }
        // Short: part of it is not in memory; the caller reads it all again, waiting.
        Ok(n as usize == buf.len())
    }

    /// Writes chunk bytes unless that would exceed the cache budget. Returns whether it wrote:
    /// a full cache means serving from memory, never a partial or corrupt cache. `direct` asks
    /// for `O_DIRECT` (no copy into the page cache), taken where `buf` and `offset` are aligned
    /// for it and the filesystem allows it.
    pub fn write_at(&self, buf: &[u8], offset: u64, direct: bool) -> Result<bool> {
        let len = buf.len() as u64;
        // Reserve before writing so concurrent writers cannot overshoot the budget together.
        let budget = self.budget.unwrap_or(u64::MAX);
        if self.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| (u + len <= budget).then_some(u + len)).is_err() {
            return Ok(false);
        }
        self.write_data(buf, offset, direct).map_err(|e| {
            self.used.fetch_sub(len, Ordering::SeqCst);
            Error::cache_io(format!("writing {len} bytes at {offset} to {}", self.dir.display()), e)
        })?;
        Ok(true)
    }

    fn write_data(&self, buf: &[u8], offset: u64, direct: bool) -> std::io::Result<()> {
        let aligned = (buf.as_ptr() as usize | buf.len() | offset as usize).is_multiple_of(DIRECT_ALIGN);
        if let Some(f) = self.data_direct.as_ref().filter(|_| direct && aligned && self.direct_ok.load(Ordering::Relaxed)) {
            match f.write_all_at(buf, offset) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Refused per write on some filesystems: stop trying. Any other error gets
                    // one buffered try of the same bytes.
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        self.direct_refused();
                    }
                    tracing::debug!(error = %e, offset, "direct cache write failed; writing through the page cache");
                }
            }
        }
        self.data.write_all_at(buf, offset)
    }

    /// Makes everything written so far durable, then persists `bits` (a snapshot taken after
    /// those writes), so no bit on disk ever points at data that could be lost.
    pub fn persist(&self, bits: &Bitmap) -> Result<()> {
        #[cfg(test)]
        if self.failing_syncs.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(Error::cache_io(format!("syncing {}", self.dir.display()), std::io::Error::from_raw_os_error(libc::EIO)));
        }
        self.data.sync_data().map_err(|e| Error::cache_io(format!("syncing {}", self.dir.display()), e))?;
        self.bitmap_file
            .write_all_at(bits.as_bytes(), 0)
            .and_then(|_| self.bitmap_file.sync_data())
            .map_err(|e| Error::cache_io(format!("writing the bitmap in {}", self.dir.display()), e))
    }

    /// Gives back budget for `bytes` of chunks no longer counted as cached.
    pub fn release(&self, bytes: u64) {
        let _ = self.used.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |u| Some(u.saturating_sub(bytes)));
    }

    /// Replaces stats.json. On a full disk the old file stays and this returns false: the
    /// counters are advisory, and the failing cache writes already report the full disk.
    pub fn write_stats(&self, json: &[u8]) -> Result<bool> {
        match write_atomic(&self.dir, "stats.json", json) {
            Ok(()) => Ok(true),
            Err(e) if is_disk_full(&e) => Ok(false),
            Err(e) => Err(Error::cache_io("writing stats.json", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: u64 = 16 << 10;

    fn store(dir: &Path, size: u64) -> CacheStore {
        let info = ImageInfo { size, etag: Some("\"e\"".into()), last_modified: None };
        let header =
            CacheHeader { format_version: CACHE_FORMAT_VERSION, url: "http://x/i".into(), info, chunk_size: CHUNK, manifest_digest: None };
        CacheStore::open(dir, "k", header, None).unwrap().0
    }

    /// Pages of `[offset, offset + len)` of the data file in the page cache.
    fn resident_pages(store: &CacheStore, offset: u64, len: usize) -> usize {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&store.data_fd());
        // SAFETY: a read-only shared mapping of an open file, unmapped below; `vec` has a byte
        // per page of it, as mincore wants.
        unsafe {
            let map = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, offset as libc::off_t);
            assert_ne!(map, libc::MAP_FAILED);
            let mut vec = vec![0u8; len.div_ceil(4096)];
            assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
            libc::munmap(map, len);
            vec.iter().filter(|&&b| b & 1 != 0).count()
        }
    }

    /// A direct write goes around the page cache, and buffered reads see its bytes even where
    /// the page cache held the hole's zeros before; the image's short tail (unaligned) is
    /// written through the page cache.
    #[test]
    fn direct_writes_read_back_over_a_stale_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * CHUNK + 100;
        let store = store(dir.path(), size);
        let mut before = vec![1u8; size as usize];
        store.read_at(&mut before, 0).unwrap();
        assert!(before.iter().all(|&b| b == 0), "a new data file reads as zeros");

        let mut run = crate::cache::PooledBuf::with_capacity(2 * CHUNK as usize);
        assert!(run.extend_from_slice(&(0..2 * CHUNK as usize).map(|i| (i % 251) as u8 + 1).collect::<Vec<_>>()));
        let run = run.into_bytes();
        assert!(store.write_at(&run, CHUNK, true).unwrap());
        if store.data_direct_fd().is_some() {
            assert_eq!(resident_pages(&store, CHUNK, 2 * CHUNK as usize), 0, "the write dropped the stale pages and added none");
        }
        let tail = vec![7u8; 100];
        assert!(store.write_at(&tail, 4 * CHUNK, true).unwrap());

        let mut after = vec![0u8; size as usize];
        store.read_at(&mut after, 0).unwrap();
        assert!(after[..CHUNK as usize].iter().all(|&b| b == 0));
        assert_eq!(&after[CHUNK as usize..3 * CHUNK as usize], &run[..]);
        assert!(after[3 * CHUNK as usize..4 * CHUNK as usize].iter().all(|&b| b == 0));
        assert_eq!(&after[4 * CHUNK as usize..], &tail[..]);
    }

    /// A direct read of a chunk written moments ago (still dirty in the page cache) returns the
    /// written bytes, not the hole's zeros that the disk holds until writeback.
    #[test]
    fn direct_reads_see_buffered_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 4 * CHUNK);
        let chunk: Vec<u8> = (0..CHUNK as usize).map(|i| (i % 251) as u8 + 1).collect();
        assert!(store.write_at(&chunk, CHUNK, false).unwrap());
        let Some(fd) = store.data_direct_fd() else {
            eprintln!("this filesystem refuses O_DIRECT; nothing to check");
            return;
        };
        let layout = std::alloc::Layout::from_size_align(CHUNK as usize, DIRECT_ALIGN).unwrap();
        // SAFETY: a non-zero size; freed below with the same layout.
        let dst = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!dst.is_null());
        // SAFETY: `dst` is CHUNK writable, page-aligned bytes.
        let n = unsafe { libc::pread(std::os::fd::AsRawFd::as_raw_fd(&fd), dst.cast(), CHUNK as usize, CHUNK as libc::off_t) };
        let err = std::io::Error::last_os_error();
        // SAFETY: CHUNK initialized bytes at `dst`, read before it is freed.
        let got = unsafe { std::slice::from_raw_parts(dst, CHUNK as usize) }.to_vec();
        // SAFETY: allocated above with this layout, freed once.
        unsafe { std::alloc::dealloc(dst, layout) };
        assert_eq!(n, CHUNK as isize, "{err}");
        assert_eq!(got, chunk);
    }
}
