//! Node cache reports: what a node tells the cluster about the images it caches, and when. The
//! channel is meant for a large cluster (the placement controller reads every node's report), so
//! a node writes only when something that placement acts on changed, batches changes that come
//! close together, and never writes more often than `ReportPolicy::min_interval`; a slow
//! heartbeat tells the controller the node is alive. Reads (`last_read`) ride along and never
//! cause a write of their own. Pure: the caller owns the clock and the API.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// One cached image on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageReport {
    pub url: String,
    pub size_bytes: u64,
    pub cached_bytes: u64,
    /// Volumes of this node that use the image now.
    pub volumes: u32,
    /// Seconds since the epoch of the last read, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_read: Option<u64>,
}

impl ImageReport {
    /// Fill in tenths (0..=10): placement cares about coarse progress, not every chunk.
    pub fn fill_tenths(&self) -> u64 {
        if self.size_bytes == 0 {
            return 10;
        }
        (self.cached_bytes.min(self.size_bytes) * 10) / self.size_bytes
    }
}

/// A node's report: its images by URL, and its cache room.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// The images the node caches, by URL.
    #[serde(default)]
    pub images: BTreeMap<String, ImageReport>,
    /// Cache room left: up to the cache limit, or the cache filesystem's free space.
    #[serde(default)]
    pub cache_free_bytes: u64,
    /// Warm orders the node cannot carry out, by LazyImage name: why.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_orders: BTreeMap<String, String>,
}

impl NodeReport {
    /// What placement acts on: which images, their fill in tenths, whether in use, and the free
    /// cache room in GiB. Equal signatures: nothing worth a write.
    #[allow(clippy::type_complexity)]
    fn signature(&self) -> (Vec<(&str, u64, bool)>, u64, Vec<&str>) {
        let images = self.images.iter().map(|(u, r)| (u.as_str(), r.fill_tenths(), r.volumes > 0)).collect();
        (images, self.cache_free_bytes >> 30, self.failed_orders.keys().map(String::as_str).collect())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ReportPolicy {
    /// Never two writes closer than this: changes within it go out together.
    pub min_interval: Duration,
    /// A write at least this often, changed or not: the controller's sign that the node lives.
    pub heartbeat: Duration,
}

impl Default for ReportPolicy {
    fn default() -> Self {
        ReportPolicy { min_interval: Duration::from_secs(60), heartbeat: Duration::from_secs(900) }
    }
}

/// When to write `current`, given what was written last (`None`: nothing yet) and how long ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Write,
    /// Not now; ask again after this long (a change waiting for the rate limit, or the heartbeat).
    WaitFor(Duration),
}

impl ReportPolicy {
    pub fn decide(&self, current: &NodeReport, written: Option<&NodeReport>, since_write: Duration) -> Decision {
        let Some(written) = written else { return Decision::Write };
        let changed = current.signature() != written.signature();
        if changed && since_write >= self.min_interval {
            return Decision::Write;
        }
        if since_write >= self.heartbeat {
            return Decision::Write;
        }
        if changed {
            Decision::WaitFor(self.min_interval - since_write)
        } else {
            Decision::WaitFor(self.heartbeat - since_write)
        }
    }
}

/// A token bucket for the controller's own writes (orders to nodes, status): bursts of up to
/// `burst`, `per_second` on average.
#[derive(Debug, Clone)]
pub struct Pacer {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Duration,
}

impl Pacer {
    pub fn new(per_second: f64, burst: f64) -> Self {
        Pacer { per_second, burst, tokens: burst, at: Duration::ZERO }
    }

    /// At time `now` (any monotonic origin), takes a token if there is one; else how long until
    /// there is.
    pub fn take(&mut self, now: Duration) -> Result<(), Duration> {
        let dt = now.saturating_sub(self.at).as_secs_f64();
        self.at = self.at.max(now);
        self.tokens = (self.tokens + dt * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
        }
    }
}

/// An image's place in the cluster, from every node's report: how many nodes hold it whole, the
/// bytes cached over all nodes, and the `max_entries` nodes holding the most of it.
pub fn aggregate<'a>(
    url: &str,
    reports: impl IntoIterator<Item = (&'a str, &'a NodeReport)>,
    max_entries: usize,
) -> (u32, u64, Vec<(String, ImageReport)>) {
    let mut warm = 0u32;
    let mut bytes = 0u64;
    let mut per_node: Vec<(String, ImageReport)> = Vec::new();
    for (node, report) in reports {
        if let Some(r) = report.images.get(url) {
            bytes = bytes.saturating_add(r.cached_bytes);
            if r.size_bytes > 0 && r.cached_bytes >= r.size_bytes {
                warm += 1;
            }
            per_node.push((node.to_string(), r.clone()));
        }
    }
    per_node.sort_by(|a, b| b.1.cached_bytes.cmp(&a.1.cached_bytes).then_with(|| a.0.cmp(&b.0)));
    per_node.truncate(max_entries);
    (warm, bytes, per_node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(fill: u64, volumes: u32, last_read: Option<u64>) -> NodeReport {
        let img = ImageReport { url: "http://o/x".into(), size_bytes: 1000, cached_bytes: fill, volumes, last_read };
        NodeReport { images: BTreeMap::from([("http://o/x".to_string(), img)]), cache_free_bytes: 50 << 30, failed_orders: BTreeMap::new() }
    }

    #[test]
    fn writes_on_change_at_most_once_per_interval_and_on_heartbeat() {
        let p = ReportPolicy { min_interval: Duration::from_secs(30), heartbeat: Duration::from_secs(600) };
        let s = Duration::from_secs;
        let written = report(0, 1, None);
        assert_eq!(p.decide(&written, None, s(0)), Decision::Write, "the first report");
        // Reads and small progress are not worth a write.
        assert_eq!(p.decide(&report(50, 1, Some(7)), Some(&written), s(40)), Decision::WaitFor(s(560)));
        // Progress past a tenth is, once the interval since the last write has passed.
        assert_eq!(p.decide(&report(150, 1, None), Some(&written), s(10)), Decision::WaitFor(s(20)));
        assert_eq!(p.decide(&report(150, 1, None), Some(&written), s(30)), Decision::Write);
        // An image no longer in use, or gone, is a change too.
        assert_eq!(p.decide(&report(0, 0, None), Some(&written), s(31)), Decision::Write);
        assert_eq!(p.decide(&NodeReport::default(), Some(&written), s(31)), Decision::Write);
        // Nothing changed for the heartbeat's time: a write all the same.
        assert_eq!(p.decide(&written, Some(&written), s(600)), Decision::Write);
    }

    #[test]
    fn pacer_allows_bursts_then_the_rate() {
        let mut p = Pacer::new(10.0, 5.0);
        let t0 = Duration::ZERO;
        for _ in 0..5 {
            assert!(p.take(t0).is_ok());
        }
        let wait = p.take(t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        assert!(p.take(Duration::from_millis(100)).is_ok());
        assert!(p.take(Duration::from_millis(100)).is_err());
        // Long idle refills only up to the burst.
        let later = Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| p.take(later).is_ok()).count(), 5);
    }

    #[test]
    fn aggregation_counts_whole_copies_and_keeps_the_biggest() {
        let a = report(1000, 1, None);
        let b = report(400, 0, None);
        let c = report(1000, 0, None);
        let nodes = [("c", &c), ("a", &a), ("b", &b), ("d", &NodeReport::default())];
        let (warm, bytes, top) = aggregate("http://o/x", nodes, 2);
        assert_eq!((warm, bytes), (2, 2400));
        assert_eq!(top.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a", "c"]);
    }
}
