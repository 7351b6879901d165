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

/// Bytes per window: a multiple of every request size the kernel sends aligned, so aligned
/// requests never straddle two windows.
const WINDOW: u64 = 32 << 20;
/// Windows kept mapped per queue (those still in use by a request stay beyond this).
const MAX_WINDOWS: usize = 64;

/// One mapped window; unmapped when the last user drops it.
pub(super) struct Window {
    base: *mut libc::c_void,
    len: usize,
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
    /// and every page is in the page cache (the driver's copy must not wait for a disk on the
    /// queue thread); else None.
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
        if !resident(ptr, len) {
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
        let w = Rc::new(Window { base, len });
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

/// True when every page of `[ptr, ptr+len)` is in the page cache.
fn resident(ptr: *const u8, len: usize) -> bool {
    const BATCH: usize = 512;
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = *PAGE.get_or_init(|| usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096));
    let first = ptr as usize & !(page - 1);
    let end = ptr as usize + len;
    let mut at = first;
    let mut vec = [0u8; BATCH];
    while at < end {
        let pages = (end - at).div_ceil(page).min(BATCH);
        // SAFETY: `at` is page aligned inside one of our mappings and `vec` has room for `pages`.
        let rc = unsafe { libc::mincore(at as *mut libc::c_void, pages * page, vec.as_mut_ptr()) };
        if rc != 0 || vec[..pages].iter().any(|v| v & 1 == 0) {
            return false;
        }
        at += pages * page;
    }
    true
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
