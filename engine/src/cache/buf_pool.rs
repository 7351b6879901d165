//! Buffers that fetched runs land in, pooled: each fresh multi-MiB allocation is a new mapping
//! whose pages fault in (zeroed by the kernel) one by one as the body arrives. In a cold
//! sequential read those faults were about a fifth of the daemon's CPU. Page-aligned, so a run
//! can be written to the cache file with `O_DIRECT` straight from its buffer.

use super::DIRECT_ALIGN;
use crate::lock;
use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes};
use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Allocation unit of small buffers (a page).
const PAGE: usize = 4096;
/// Buffers of at least this capacity are pooled (smaller ones come from the allocator's heap
/// without new mappings anyway).
const POOL_MIN: usize = 256 << 10;
/// Bytes of free buffers kept at most: eight of the engine's default 8 MiB requests.
const POOL_MAX_BYTES: usize = 64 << 20;

/// Free buffers unused for this long are given back to the system (`trim_idle`).
const POOL_IDLE: Duration = Duration::from_secs(5);

/// A free buffer: its start, its capacity, and since when it is free.
struct FreeBuf(NonNull<u8>, usize, Instant);
// SAFETY: a free buffer is owned by the pool alone.
unsafe impl Send for FreeBuf {}

static POOL: Mutex<(Vec<FreeBuf>, usize)> = Mutex::new((Vec::new(), 0));

/// Frees the pooled buffers nobody took for a few seconds: a node plugin that read a large
/// image kept 64 MiB of them for as long as it ran.
pub fn trim_idle() {
    trim_older_than(POOL_IDLE);
}

/// Frees every pooled buffer (nothing is being read any more).
pub fn trim_all() {
    trim_older_than(Duration::ZERO);
}

fn trim_older_than(idle: Duration) {
    let old: Vec<FreeBuf> = {
        let mut pool = lock(&POOL);
        let (keep, old): (Vec<FreeBuf>, Vec<FreeBuf>) = std::mem::take(&mut pool.0).into_iter().partition(|b| b.2.elapsed() < idle);
        pool.0 = keep;
        pool.1 -= old.iter().map(|b| b.1).sum::<usize>();
        old
    };
    for FreeBuf(ptr, cap, _) in old {
        // SAFETY: allocated in `with_capacity` with this layout; the pool let go of it above.
        unsafe { dealloc(ptr.as_ptr(), direct_layout(cap)) }
    }
}

/// Size and alignment of a transparent huge page on x86-64 and arm64 (with 4 KiB pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// The layout of a buffer of `len` bytes (at least one) that `O_DIRECT` I/O can use: aligned to
/// `DIRECT_ALIGN`, and to a huge page from a huge page's size up (see `advise_huge`). Shared
/// with the FUSE ring's buffers, which take direct reads.
pub fn direct_layout(len: usize) -> Layout {
    let align = if len >= HUGE_PAGE { HUGE_PAGE } else { DIRECT_ALIGN };
    Layout::from_size_align(len.max(1), align).unwrap_or_else(|_| handle_alloc_error(Layout::new::<u8>()))
}

/// Asks for `[ptr, ptr + len)` (from an allocation with `direct_layout(len)`) to be backed by
/// huge pages where the system allows it (transparent huge pages in `madvise` mode, as Debian
/// ships). Buffers fill once and are dropped: with 4 KiB pages a cold sequential read faulted in
/// about 60 pages per MiB, each zeroed and mapped alone, and the kernel pinned each page of a
/// buffer one by one for every direct write. Only a hint: refused, the pages stay small. Where
/// memory is fragmented the kernel may compact it on such a fault (`defrag` in `madvise` mode,
/// Debian's default): paid once per buffer while the pool keeps it.
pub fn advise_huge(ptr: *mut u8, len: usize) {
    if len >= HUGE_PAGE {
        // SAFETY: madvise only changes how the (owned, mapped) range is backed, never its bytes.
        unsafe { libc::madvise(ptr.cast(), len, libc::MADV_HUGEPAGE) };
    }
}

/// A buffer filled from the front; only the filled part is ever read.
pub struct PooledBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: plain bytes owned by this value alone; `&` gives only reads of the filled part.
unsafe impl Send for PooledBuf {}
// SAFETY: as for Send: shared references only read.
unsafe impl Sync for PooledBuf {}

impl PooledBuf {
    /// An empty buffer that holds at least `min` bytes.
    pub fn with_capacity(min: usize) -> Self {
        let cap = if min >= POOL_MIN { min.next_power_of_two() } else { min.max(1).next_multiple_of(PAGE) };
        if cap >= POOL_MIN {
            let mut pool = lock(&POOL);
            if let Some(i) = pool.0.iter().position(|b| b.1 == cap) {
                let FreeBuf(ptr, _, _) = pool.0.swap_remove(i);
                pool.1 -= cap;
                return PooledBuf { ptr, cap, len: 0 };
            }
        }
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc(direct_layout(cap)) }).unwrap_or_else(|| handle_alloc_error(direct_layout(cap)));
        advise_huge(ptr.as_ptr(), cap);
        PooledBuf { ptr, cap, len: 0 }
    }

    /// The start of the allocation; it never moves while the buffer lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `b`; false (and nothing appended) if it does not fit.
    pub fn extend_from_slice(&mut self, b: &[u8]) -> bool {
        if b.len() > self.cap - self.len {
            return false;
        }
        // SAFETY: the destination `[len, len + b.len())` lies within the allocation, and `b`
        // cannot overlap memory this buffer owns exclusively.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.as_ptr().add(self.len), b.len()) };
        self.len += b.len();
        true
    }

    /// Room for appending in place, at most `max` bytes of what is free: a socket reads
    /// straight into the buffer instead of into one of its own first.
    pub fn spare(&mut self, max: usize) -> Spare<'_> {
        let room = max.min(self.cap - self.len);
        Spare { buf: self, room }
    }

    /// The filled part as `Bytes`, without a copy; the buffer goes back to the pool (or is freed)
    /// with the last clone.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

/// Free space at the end of a `PooledBuf`; what is written into it is appended.
pub struct Spare<'a> {
    buf: &'a mut PooledBuf,
    room: usize,
}

// SAFETY: `chunk_mut` hands out exactly the `room` bytes past the filled part, which lie within
// the allocation, and `advance_mut` appends at most what is left of them.
unsafe impl BufMut for Spare<'_> {
    fn remaining_mut(&self) -> usize {
        self.room
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        assert!(cnt <= self.room, "advanced past the free space");
        self.buf.len += cnt;
        self.room -= cnt;
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        // SAFETY: `[len, len + room)` lies within the allocation and nothing else refers to it.
        unsafe { UninitSlice::from_raw_parts_mut(self.buf.ptr.as_ptr().add(self.buf.len), self.room) }
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written, by `extend_from_slice` or through `spare`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if self.cap >= POOL_MIN {
            let mut pool = lock(&POOL);
            if pool.1 + self.cap <= POOL_MAX_BYTES {
                pool.1 += self.cap;
                pool.0.push(FreeBuf(self.ptr, self.cap, Instant::now()));
                return;
            }
        }
        // SAFETY: allocated in `with_capacity` with this layout, freed once (not pooled).
        unsafe { dealloc(self.ptr.as_ptr(), direct_layout(self.cap)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_part_only_and_bounded() {
        let mut b = PooledBuf::with_capacity(3 * PAGE);
        assert!(b.extend_from_slice(b"hello"));
        assert!(b.extend_from_slice(&vec![9u8; 2 * PAGE - 5]));
        assert!(!b.extend_from_slice(&vec![1u8; 2 * PAGE]), "past the capacity");
        let bytes = b.into_bytes();
        assert_eq!(bytes.len(), 2 * PAGE);
        assert_eq!(&bytes[..5], b"hello");
        assert!(bytes[5..].iter().all(|&x| x == 9));
        assert_eq!(bytes.as_ptr() as usize % PAGE, 0);
        assert_eq!(PooledBuf::with_capacity(0).into_bytes().len(), 0);
    }

    #[test]
    fn spare_appends_in_place_within_its_room() {
        let mut b = PooledBuf::with_capacity(PAGE);
        assert!(b.extend_from_slice(b"ab"));
        let mut room = b.spare(3);
        assert_eq!(room.remaining_mut(), 3);
        room.put_slice(b"cde");
        assert_eq!(room.remaining_mut(), 0);
        assert_eq!(b.as_ref(), b"abcde");
        // Never more than the capacity, whatever is asked.
        assert_eq!(b.spare(usize::MAX).remaining_mut(), PAGE - 5);
    }

    #[test]
    fn pooled_buffers_come_back_empty_and_the_pool_stays_bounded() {
        let size = 1 << 20;
        let bufs: Vec<_> = (0..64)
            .map(|i| {
                let mut b = PooledBuf::with_capacity(size);
                assert!(b.is_empty(), "a reused buffer shows none of its old bytes");
                assert!(b.extend_from_slice(&vec![i as u8; size]));
                b.into_bytes()
            })
            .collect();
        drop(bufs);
        assert!(POOL.lock().unwrap().1 <= POOL_MAX_BYTES);
        let mut again = PooledBuf::with_capacity(size);
        assert!(again.is_empty());
        assert!(again.extend_from_slice(&[5u8; 10]));
        assert_eq!(again.as_ref(), &[5u8; 10]);
    }

    /// KiB of huge pages backing the mapping that holds `addr` (from /proc/self/smaps).
    fn huge_kib_at(addr: usize) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or_default();
            if let Some((a, b)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
                let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
                inside = (a..b).contains(&addr);
            } else if inside && first == "AnonHugePages:" {
                return line.split_whitespace().nth(1).unwrap().parse().unwrap();
            }
        }
        0
    }

    /// Large buffers start on a huge page and, where the system gives huge pages to ranges that
    /// ask (`madvise` or `always` mode), are backed by them once filled.
    #[test]
    fn large_buffers_sit_on_huge_pages() {
        // 16 MiB: no other test of this crate uses buffers of that size.
        let cap = 16 << 20;
        let mut b = PooledBuf::with_capacity(cap);
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
        assert!(b.extend_from_slice(&vec![3u8; cap]));
        let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
        if !(mode.contains("[madvise]") || mode.contains("[always]")) {
            eprintln!("transparent huge pages are off here ({}); nothing more to check", mode.trim());
            return;
        }
        let huge = huge_kib_at(b.as_ptr() as usize);
        assert!(huge >= (HUGE_PAGE >> 10) as u64, "{huge} KiB of huge pages behind a filled {cap}-byte buffer");
        assert!(b.as_ref().iter().all(|&x| x == 3));
    }

    /// Buffers stay pooled while in use now and then, and go back to the system once idle.
    #[test]
    fn idle_buffers_are_trimmed() {
        // 4 MiB: no other test of this crate uses buffers of that size.
        let cap = 4 << 20;
        let held = |cap: usize| POOL.lock().unwrap().0.iter().filter(|b| b.1 == cap).count();
        drop(PooledBuf::with_capacity(cap));
        assert_eq!(held(cap), 1);
        trim_older_than(Duration::from_secs(3600));
        assert_eq!(held(cap), 1, "a buffer freed just now is kept");
        trim_all();
        assert_eq!(held(cap), 0, "an idle buffer is given back");
        let pool = POOL.lock().unwrap();
        assert_eq!(pool.1, pool.0.iter().map(|b| b.1).sum::<usize>(), "the byte count follows");
    }
}
