//! Counters for one attached image, shared by the reader, the fetchers and the retry wrapper.
//! Snapshots are serialisable so `lazy-image stat` and metrics exporters can read them.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (ms) of the fetch-latency histogram buckets; the last bucket is unbounded.
pub const LATENCY_BUCKETS_MS: [u64; 10] = [1, 2, 5, 10, 20, 50, 100, 250, 1000, 5000];

#[derive(Default, Debug)]
pub struct Stats {
    reads: AtomicU64,
    bytes_read: AtomicU64,
    chunk_hits: AtomicU64,
    chunk_misses: AtomicU64,
    origin_requests: AtomicU64,
    origin_bytes: AtomicU64,
    retries: AtomicU64,
    errors: AtomicU64,
    verify_failures: AtomicU64,
    cache_write_errors: AtomicU64,
    readahead_chunks: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    latency_sum_us: AtomicU64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub bytes_read: u64,
    pub chunk_hits: u64,
    pub chunk_misses: u64,
    pub origin_requests: u64,
    pub origin_bytes: u64,
    pub retries: u64,
    pub errors: u64,
    pub verify_failures: u64,
    pub cache_write_errors: u64,
    pub readahead_chunks: u64,
    /// Counts per bucket of `LATENCY_BUCKETS_MS`, plus one overflow bucket.
    pub fetch_latency_buckets: Vec<u64>,
    pub fetch_latency_sum_us: u64,
    /// Bytes of read-ahead runs held in memory for readers that have not copied them yet (a
    /// gauge, as of the snapshot).
    #[serde(default)]
    pub recent_bytes: u64,
}

impl StatsSnapshot {
    /// Adds another blob's counters: a device made of several blobs reports their sum.
    pub fn add(&mut self, o: &StatsSnapshot) {
        self.reads += o.reads;
        self.bytes_read += o.bytes_read;
        self.chunk_hits += o.chunk_hits;
        self.chunk_misses += o.chunk_misses;
        self.origin_requests += o.origin_requests;
        self.origin_bytes += o.origin_bytes;
        self.retries += o.retries;
        self.errors += o.errors;
        self.verify_failures += o.verify_failures;
        self.cache_write_errors += o.cache_write_errors;
        self.readahead_chunks += o.readahead_chunks;
        if self.fetch_latency_buckets.len() < o.fetch_latency_buckets.len() {
            self.fetch_latency_buckets.resize(o.fetch_latency_buckets.len(), 0);
        }
        for (a, b) in self.fetch_latency_buckets.iter_mut().zip(&o.fetch_latency_buckets) {
            *a += b;
        }
        self.fetch_latency_sum_us += o.fetch_latency_sum_us;
        self.recent_bytes += o.recent_bytes;
    }
}

impl Stats {
    pub(crate) fn count_read(&self, bytes: u64) {
        self.reads.fetch_add(1, Relaxed);
        self.bytes_read.fetch_add(bytes, Relaxed);
    }
    pub(crate) fn count_chunks(&self, hits: u64, misses: u64) {
        self.chunk_hits.fetch_add(hits, Relaxed);
        self.chunk_misses.fetch_add(misses, Relaxed);
    }
    pub(crate) fn count_fetch(&self, bytes: u64, took: Duration) {
        self.origin_requests.fetch_add(1, Relaxed);
        self.origin_bytes.fetch_add(bytes, Relaxed);
        let ms = took.as_millis() as u64;
        let idx = LATENCY_BUCKETS_MS.iter().position(|&b| ms <= b).unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency[idx].fetch_add(1, Relaxed);
        self.latency_sum_us.fetch_add(took.as_micros() as u64, Relaxed);
    }
    pub(crate) fn count_retry(&self) {
        self.retries.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_verify_failure(&self) {
        self.verify_failures.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_cache_write_error(&self) {
        self.cache_write_errors.fetch_add(1, Relaxed);
    }
    pub(crate) fn count_readahead(&self, chunks: u64) {
        self.readahead_chunks.fetch_add(chunks, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            reads: self.reads.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            chunk_hits: self.chunk_hits.load(Relaxed),
            chunk_misses: self.chunk_misses.load(Relaxed),
            origin_requests: self.origin_requests.load(Relaxed),
            origin_bytes: self.origin_bytes.load(Relaxed),
            retries: self.retries.load(Relaxed),
            errors: self.errors.load(Relaxed),
            verify_failures: self.verify_failures.load(Relaxed),
            cache_write_errors: self.cache_write_errors.load(Relaxed),
            readahead_chunks: self.readahead_chunks.load(Relaxed),
            fetch_latency_buckets: self.latency.iter().map(|b| b.load(Relaxed)).collect(),
            fetch_latency_sum_us: self.latency_sum_us.load(Relaxed),
            recent_bytes: 0,
        }
    }
}
