//! The local block cache of one image: a sparse data file the size of the image, a bitmap of the
//! chunks present, and a header that says which origin version the bytes belong to.
//!
//! Layout under the cache root: `<key>/header.json`, `<key>/data`, `<key>/bitmap`, `<key>/lock`,
//! `<key>/stats.json`. The key is the pinned digest when there is one (so presigned URLs that
//! change their query share a cache) or a hash of the URL.
//!
//! Crash consistency: a bit reaches the bitmap file only after a `fdatasync` of the data file that
//! follows the chunk's write, and bits are only ever added while a header stays the same, so any
//! mix of old and new bitmap bytes after a crash describes durable data.

mod bitmap;
mod buf_pool;
mod evict;
mod store;

pub use bitmap::Bitmap;
pub use buf_pool::{advise_huge, direct_layout, trim_all as trim_all_buffers, trim_idle as trim_idle_buffers, PooledBuf, HUGE_PAGE};
pub use evict::{evict_unused, list_images, pin, unpin, CachedImage};
pub use store::{cache_key, CacheHeader, CacheStore, CACHE_FORMAT_VERSION, DATA_FILE, DIRECT_ALIGN};
