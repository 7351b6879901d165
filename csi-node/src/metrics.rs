//! Prometheus metrics over HTTP (`GET /metrics`, text format 0.0.4), per volume: chunk hits and
//! misses, bytes and requests to the origin, retries, errors, verification failures, cache fill
//! and the fetch latency histogram; per node: warm orders held and cache reports written. Read
//! from the engine's counters at scrape time.

use crate::volumes::Volumes;
use lazy_image_engine::stats::LATENCY_BUCKETS_MS;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;

/// A counter's name, help text, and how to read it from a volume's stats.
type Counter = (&'static str, &'static str, fn(&lazy_image_engine::StatsSnapshot) -> u64);

pub fn render(volumes: &Volumes) -> String {
    let rows = volumes.metrics();
    let mut out = String::new();
    let counters: [Counter; 8] = [
        ("lazy_image_chunk_hits_total", "Chunks served from the local cache.", |s| s.chunk_hits),
        ("lazy_image_chunk_misses_total", "Chunks that had to be fetched.", |s| s.chunk_misses),
        ("lazy_image_origin_bytes_total", "Bytes fetched from the origin.", |s| s.origin_bytes),
        ("lazy_image_origin_requests_total", "Ranged requests sent to the origin.", |s| s.origin_requests),
        ("lazy_image_retries_total", "Origin requests retried.", |s| s.retries),
        ("lazy_image_read_errors_total", "Reads that failed.", |s| s.errors),
        ("lazy_image_verify_failures_total", "Chunks that failed manifest verification.", |s| s.verify_failures),
        ("lazy_image_bytes_read_total", "Bytes read by the volume's users.", |s| s.bytes_read),
    ];
    let label = |id: &str, url: &str| format!("volume_id=\"{}\",url=\"{}\"", escape(id), escape(url));
    for (name, help, get) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (id, url, s, _) in &rows {
            let _ = writeln!(out, "{name}{{{}}} {}", label(id, url), get(s));
        }
    }
    let _ = writeln!(
        out,
        "# HELP lazy_image_cache_fill_ratio Share of the image present in the local cache.\n# TYPE lazy_image_cache_fill_ratio gauge"
    );
    for (id, url, _, fill) in &rows {
        let _ = writeln!(out, "lazy_image_cache_fill_ratio{{{}}} {fill}", label(id, url));
    }
    use std::sync::atomic::Ordering::Relaxed;
    let node = [
        (
            "lazy_image_warm_orders",
            "gauge",
            "Warm orders this node carries out (images fetched whole and pinned).",
            volumes.orders_gauge.load(Relaxed),
        ),
        (
            "lazy_image_cache_report_writes_total",
            "counter",
            "Cache reports written to this node's NodeCache.",
            volumes.report_writes.load(Relaxed),
        ),
    ];
    for (name, kind, help, v) in node {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    let name = "lazy_image_fetch_duration_seconds";
    let _ = writeln!(out, "# HELP {name} Time of one ranged request to the origin.\n# TYPE {name} histogram");
    for (id, url, s, _) in &rows {
        let l = label(id, url);
        let mut cum = 0;
        for (i, le) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cum += s.fetch_latency_buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{l},le=\"{}\"}} {cum}", *le as f64 / 1000.0);
        }
        cum += s.fetch_latency_buckets.get(LATENCY_BUCKETS_MS.len()).copied().unwrap_or(0);
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {cum}");
        let _ = writeln!(out, "{name}_sum{{{l}}} {}", s.fetch_latency_sum_us as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{{l}}} {cum}");
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves `/metrics` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, volumes: Arc<Volumes>) -> std::io::Result<()> {
    lazy_image_csi_common::serve_metrics(addr, Arc::new(move || render(&volumes))).await
}
