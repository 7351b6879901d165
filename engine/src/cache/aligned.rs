//! Heap buffers aligned for direct I/O. Fetched runs land in one, so the cache can write them to
//! its data file with `O_DIRECT` instead of copying them into the page cache first.

use bytes::Bytes;
use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ptr::NonNull;

/// Memory address, file offset and length must all be multiples of this for a direct write
/// (the largest logical block size in common use).
pub const DIRECT_ALIGN: usize = 4096;

/// Whether a write of `buf` at `offset` meets `O_DIRECT`'s alignment rules.
pub fn direct_aligned(buf: &[u8], offset: u64) -> bool {
    let mask = DIRECT_ALIGN - 1; // a power of two
    (buf.as_ptr() as usize) & mask == 0 && offset & mask as u64 == 0 && buf.len() & mask == 0 && !buf.is_empty()
}

/// A zeroed, `DIRECT_ALIGN`-aligned byte buffer that frees itself.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain bytes owned by this value alone; `&` gives only shared reads.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        // A zero-sized allocation is not allowed; one byte of capacity keeps `len` 0 valid.
        let layout = Layout::from_size_align(len.max(1), DIRECT_ALIGN).unwrap_or_else(|_| panic!("buffer of {len} bytes"));
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap_or_else(|| handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` holds `layout.size()` initialized (zeroed) bytes, borrowed uniquely here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The first `len` bytes as `Bytes`, without a copy; the buffer is freed with the last clone.
    pub fn into_bytes(self, len: usize) -> Bytes {
        let len = len.min(self.layout.size());
        Bytes::from_owner(self).slice(..len)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as in `as_mut_slice`, shared.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_keep_alignment_and_contents() {
        let mut b = AlignedBuf::zeroed(3 * DIRECT_ALIGN);
        b.as_mut_slice()[..5].copy_from_slice(b"hello");
        let bytes = b.into_bytes(2 * DIRECT_ALIGN);
        assert_eq!(bytes.len(), 2 * DIRECT_ALIGN);
        assert_eq!(&bytes[..5], b"hello");
        assert!(bytes[5..].iter().all(|&x| x == 0));
        assert!(direct_aligned(&bytes, 8192));
        assert!(!direct_aligned(&bytes, 100), "unaligned offset");
        assert!(!direct_aligned(&bytes[1..], 0), "unaligned address and length");
        assert!(!direct_aligned(&bytes[..DIRECT_ALIGN - 1], 0), "short length");
        assert_eq!(AlignedBuf::zeroed(0).into_bytes(0).len(), 0);
    }
}
