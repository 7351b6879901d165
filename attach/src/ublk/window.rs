//! Windows of the cache file mapped read-only into a queue's address space, for large cached
//! reads. The queue commits a request with its buffer address pointing into a window, so the
//! driver copies the bytes straight from the page cache into the request: one copy, as the
//! kernel's loop device makes, where a `pread` into the tag's buffer makes two.
//!
//! Windows are bounded in number (mapping a whole image would leave page tables behind for every
//! page ever read), and a window stays mapped while any request still uses it: the driver reads
//! the address only when the commit is submitted, and an address unmapped (or mapped anew to
//! another part of the file) by then would fail the read or serve the wrong bytes.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Bytes per window: a multiple of every request size the kernel sends aligned, so aligned
/// requests never straddle two windows.
const WINDOW: u64 = 32 << 20;
/// Windows kept mapped per queue (those still in use by a request stay beyond this).
const MAX_WINDOWS: usize = 64;

/// How long a window's residency snapshot stands in for asking the kernel again.
const FRESH: Duration = Duration::from_millis(20);

/// One mapped window; unmapped when the last user drops it.
pub(super) struct Window {
    base: *mut libc::c_void,
    len: usize,
    /// Which of its pages were in the page cache, and when that was asked: `mincore` costs the
    /// kernel a zeroed page per call, so one call answers every request for a while.
    seen: RefCell<Option<(Instant, Vec<u8>)>>,
}

impl Window {
    /// Whether pages `[first, last]` of the window are in the page cache, by a snapshot at most
    /// `FRESH` old (taken again when older), or else by asking the kernel about them (pages
    /// cached since the snapshot). A page evicted since the snapshot is read from disk by the
    /// driver's copy, on the queue thread: slower for that request, never wrong.
    fn resident(&self, first: usize, last: usize) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.borrow_mut();
        if seen.as_ref().is_none_or(|(at, _)| now.duration_since(*at) > FRESH) {
            *seen = snapshot(self.base, self.len).map(|v| (now, v));
        }
        let Some((_, pages)) = seen.as_mut() else { return false };
        let Some(pages) = pages.get_mut(first..=last) else { return false };
        if pages.iter().all(|b| b & 1 != 0) {
            return true;
        }
        let page = page_size();
        // SAFETY: pages `first..=last` lie inside the window (`pages` has a byte for each).
        let start = unsafe { self.base.cast::<u8>().add(first * page) };
        match snapshot(start.cast(), (last - first + 1) * page) {
            Some(now) if now.iter().all(|b| b & 1 != 0) => {
                pages.copy_from_slice(&now);
                true
            }
            _ => false,
        }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly one mapping made in `Windows::map`, unmapped once.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Mapped windows of one queue's cache file (single-threaded: one per queue thread).
pub(super) struct Windows {
    fd: RawFd,
    file_len: u64,
    by_index: RefCell<HashMap<u64, Rc<Window>>>,
    /// Mapping order, oldest first, for eviction.
    order: RefCell<VecDeque<u64>>,
}

/// A cached range as the mapped bytes of the cache file, with the window that keeps them mapped.
pub(super) struct Mapped {
    _window: Rc<Window>,
    ptr: *const u8,
    len: usize,
}

impl Mapped {
    /// The bytes, for the commit's buffer address.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` lies inside the window `_window`, mapped read-only while this
        // value lives. The range is cached and verified; the engine never rewrites cached bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Windows {
    /// Windows of the file `fd` (the cache's data file, open for as long as the queue runs),
    /// `file_len` bytes long.
    pub fn new(fd: RawFd, file_len: u64) -> Self {
        Windows { fd, file_len, by_index: RefCell::default(), order: RefCell::default() }
    }

    /// The descriptor these windows map.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// `len` bytes at `offset`, mapped, when they lie in one window (mapped now unless `only_mapped`)
    /// and every page is in the page cache (the driver's copy should not wait for a disk on the
    /// queue thread; see `Window::resident`); else None.
    pub fn get(&self, offset: u64, len: usize, only_mapped: bool) -> Option<Mapped> {
        let idx = offset / WINDOW;
        let end = offset.checked_add(len as u64)?;
        if len == 0 || end > self.file_len || (end - 1) / WINDOW != idx {
            return None;
        }
        let window = if only_mapped { self.by_index.borrow().get(&idx).cloned()? } else { self.window(idx)? };
        let at = (offset - idx * WINDOW) as usize;
        // SAFETY: `at + len <= window.len`: the window spans [idx*WINDOW, min(file_len, (idx+1)*WINDOW)).
        let ptr = unsafe { window.base.cast::<u8>().add(at) };
        let page = page_size();
        if !window.resident(at / page, (at + len - 1) / page) {
            return None;
        }
        Some(Mapped { _window: window, ptr, len })
    }

    fn window(&self, idx: u64) -> Option<Rc<Window>> {
        if let Some(w) = self.by_index.borrow().get(&idx) {
            return Some(w.clone());
        }
        let start = idx * WINDOW;
        let len = WINDOW.min(self.file_len - start) as usize;
        // SAFETY: a fresh read-only shared mapping of `fd`; the kernel picks the address.
        let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, self.fd, start as libc::off_t) };
        if base == libc::MAP_FAILED {
            tracing::debug!(error = %std::io::Error::last_os_error(), "mapping a cache window failed; reading instead");
            return None;
        }
        let w = Rc::new(Window { base, len, seen: RefCell::new(None) });
        let mut order = self.order.borrow_mut();
        let mut by_index = self.by_index.borrow_mut();
        while order.len() >= MAX_WINDOWS {
            // Requests holding the oldest window keep it mapped until they are done with it.
            if let Some(old) = order.pop_front() {
                by_index.remove(&old);
            }
        }
        order.push_back(idx);
        by_index.insert(idx, w.clone());
        Some(w)
    }
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no memory-safety preconditions.
    *PAGE.get_or_init(|| usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096))
}

/// `mincore` of `[base, base+len)` (page aligned, in one of our mappings): a byte per page, bit
/// 0 set when resident.
fn snapshot(base: *mut libc::c_void, len: usize) -> Option<Vec<u8>> {
    let mut vec = vec![0u8; len.div_ceil(page_size())];
    // SAFETY: `base` is page aligned and `[base, base+len)` lies in one of our mappings (the
    // callers' contract), and `vec` has a byte for each of its pages.
    let rc = unsafe { libc::mincore(base, len, vec.as_mut_ptr()) };
    (rc == 0).then_some(vec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// A file on a disk filesystem (a tmpfs page cache cannot be dropped); unnamed, so nothing
    /// is left behind.
    fn disk_tempfile() -> std::fs::File {
        tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    fn drop_from_page_cache(f: &std::fs::File) {
        f.sync_all().unwrap();
        // SAFETY: advice on a descriptor we own; no memory is involved.
        assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    }

    #[test]
    fn mapped_ranges_hold_the_files_bytes_and_only_when_resident() {
        let mut f = disk_tempfile();
        let data: Vec<u8> = (0..(WINDOW + (3 << 20))).map(|i| (i * 7 + i / 4096) as u8).collect();
        f.write_all(&data).unwrap();
        drop_from_page_cache(&f);
        let w = Windows::new(f.as_raw_fd(), data.len() as u64);
        let at = WINDOW - (2 << 20);
        assert!(w.get(at, 1 << 20, false).is_none(), "pages not in the page cache are not offered");
        let mut buf = vec![0u8; 1 << 20];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, at).unwrap();
        let m = w.get(at, 1 << 20, false).expect("resident now");
        assert_eq!(m.as_slice(), &data[at as usize..][..1 << 20]);
        // The last window is short: it ends with the file.
        let tail = data.len() as u64 - (1 << 20);
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, tail).unwrap();
        assert_eq!(w.get(tail, 1 << 20, false).expect("resident").as_slice(), &data[tail as usize..]);
        assert!(w.get(WINDOW - 4096, 8192, false).is_none(), "a range across two windows is read instead");
        assert!(w.get(2 * WINDOW, 4096, true).is_none() && !w.by_index.borrow().contains_key(&2), "small reads map nothing");
        assert_eq!(w.get(at, 4096, true).expect("in a window already mapped").as_slice(), &data[at as usize..][..4096]);
        assert!(w.get(tail, (1 << 20) + 512, false).is_none(), "past the end of the file");
    }

    #[test]
    fn a_window_in_use_stays_mapped_when_evicted() {
        let f = disk_tempfile();
        let len = WINDOW * (MAX_WINDOWS as u64 + 2);
        f.set_len(len).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"first window", 100).unwrap();
        let w = Windows::new(f.as_raw_fd(), len);
        let held = w.get(0, 4096, false).expect("just written, so resident");
        for i in 1..=MAX_WINDOWS as u64 + 1 {
            // Holes are not resident: nothing is offered, but each call maps its window.
            let _ = w.get(i * WINDOW, 4096, false);
        }
        assert!(!w.by_index.borrow().contains_key(&0), "the oldest window left the set");
        assert!(w.by_index.borrow().len() <= MAX_WINDOWS);
        assert_eq!(&held.as_slice()[100..112], b"first window", "still mapped for its user");
    }
}
