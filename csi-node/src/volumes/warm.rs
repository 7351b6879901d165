//! Warm orders and the node's cache report, on the volumes' side: an order opens its image in
//! the same pool as volumes, with the same background fill as the `prefetch` attribute (so it
//! pauses and resumes as that does), and pins the image's cache so eviction keeps it; a withdrawn
//! order releases and unpins it. The report says what every cache under the cache root holds.
//! Nothing here talks to the API server (`crate::reporter` does).

use super::{lock, PooledImage, Volumes};
use lazy_image_csi_common::node_cache::WarmOrder;
use lazy_image_csi_common::reports::{ImageReport, NodeReport};
use lazy_image_engine::cache::{list_images, pin, unpin};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// The orders being carried out, by LazyImage name, and whether pins left by an earlier plugin
/// were swept.
#[derive(Default)]
pub struct HeldOrders {
    orders: BTreeMap<String, Held>,
    swept: bool,
}

struct Held {
    order: WarmOrder,
    image: PooledImage,
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Volumes {
    /// Carries out `wanted` (the NodeCache's spec): opens and pins what is newly ordered,
    /// releases and unpins what is no longer, and, the first time, unpins caches pinned by
    /// orders this plugin does not hold (withdrawn while no plugin was running). Returns the orders it cannot carry out
    /// and why; they are tried again on the next call.
    pub async fn apply_orders(&self, wanted: &[WarmOrder]) -> BTreeMap<String, String> {
        let mut held = self.orders.lock().await;
        let mut want: BTreeMap<&str, &WarmOrder> = BTreeMap::new();
        for o in wanted {
            want.entry(o.image.as_str()).or_insert(o);
        }
        let gone: Vec<String> =
            held.orders.iter().filter(|(k, h)| want.get(k.as_str()) != Some(&&h.order)).map(|(k, _)| k.clone()).collect();
        for name in gone {
            if let Some(h) = held.orders.remove(&name) {
                let dirs = h.image.dirs.clone();
                tracing::info!(image = %name, caches = dirs.len(), "warm order withdrawn: the image may be evicted again");
                self.release_image(h.image).await;
                // Before any new order opens its image: that one may need this one's room. A blob
                // another order's image shares stays pinned.
                for dir in dirs {
                    if !held.orders.values().any(|o| o.image.dirs.contains(&dir)) {
                        if let Err(e) = unpin(&dir) {
                            tracing::warn!(cache = %dir.display(), error = %e.report(), "cannot unpin a withdrawn image's cache");
                        }
                    }
                }
            }
        }
        let mut failed = BTreeMap::new();
        for (name, order) in want {
            if held.orders.contains_key(name) {
                continue;
            }
            let mut attrs: HashMap<String, String> = order.attributes.clone().into_iter().collect();
            attrs.insert("prefetch".into(), "true".into());
            let spec = match lazy_image_csi_common::attributes::VolumeSpec::from_attributes(&attrs) {
                Ok(s) => s,
                Err(e) => {
                    failed.insert(name.to_string(), format!("bad order: {e}"));
                    continue;
                }
            };
            match self.open_image(&spec, None).await {
                Ok(image) => {
                    for dir in &image.dirs {
                        if let Err(e) = pin(dir) {
                            tracing::warn!(image = %name, error = %e.report(), "cannot pin the warm image's cache");
                        }
                    }
                    tracing::info!(image = %name, url = %spec.url, "warm order taken: fetching the whole image");
                    held.orders.insert(name.to_string(), Held { order: order.clone(), image });
                }
                Err(e) => {
                    tracing::warn!(image = %name, error = %e, "cannot carry out a warm order; retrying later");
                    failed.insert(name.to_string(), e.to_string());
                }
            }
        }
        self.orders_gauge.store(held.orders.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // Once per plugin: later withdrawals unpin their own caches above.
        if !held.swept {
            let pinned_now: HashSet<PathBuf> = held.orders.values().flat_map(|h| h.image.dirs.iter().cloned()).collect();
            for c in list_images(&self.cfg.cache_dir).unwrap_or_default() {
                if c.pinned && !pinned_now.contains(&c.dir) {
                    if let Err(e) = unpin(&c.dir) {
                        tracing::warn!(cache = %c.dir.display(), error = %e.report(), "cannot unpin a cache no order keeps");
                    }
                }
            }
            held.swept = true;
        }
        failed
    }

    /// How many warm orders are carried out now.
    pub async fn orders_held(&self) -> usize {
        self.orders.lock().await.orders.len()
    }

    /// What the node caches: every image cache under the cache root (live fill for open ones),
    /// the volumes using each, when each was last read, and the cache room left.
    pub async fn cache_report(&self, failed_orders: BTreeMap<String, String>) -> NodeReport {
        let cached = list_images(&self.cfg.cache_dir).unwrap_or_else(|e| {
            tracing::warn!(error = %e.report(), "cannot list the image caches for the report");
            Vec::new()
        });
        let mut volumes: HashMap<PathBuf, u32> = HashMap::new();
        for l in lock(&self.live).values() {
            if let Some(i) = &l.image {
                *volumes.entry(i.image.cache_dir()).or_default() += 1;
            }
        }
        let open: HashMap<PathBuf, lazy_image_engine::LazyImage> =
            self.pool.lock().await.open.values().map(|p| (p.image.cache_dir(), p.image.clone())).collect();
        let now = epoch_secs(SystemTime::now());
        let mut images: BTreeMap<String, ImageReport> = BTreeMap::new();
        let mut used = 0u64;
        let mut seen = lock(&self.reads_seen);
        let mut still: HashSet<PathBuf> = HashSet::new();
        for c in &cached {
            used = used.saturating_add(c.disk_bytes);
            let size = c.header.info.size;
            let (chunks, last_read) = match open.get(&c.dir) {
                Some(img) => {
                    // A change in the read counter since the last report: read since then.
                    let reads = img.stats().reads;
                    let e = seen.entry(c.dir.clone()).or_insert((reads, epoch_secs(c.last_used)));
                    if e.0 != reads {
                        *e = (reads, now);
                    }
                    still.insert(c.dir.clone());
                    (img.fill().0, Some(e.1))
                }
                None => (c.chunks_present, Some(epoch_secs(c.last_used))),
            };
            let report = ImageReport {
                url: c.header.url.clone(),
                size_bytes: size,
                cached_bytes: chunks.saturating_mul(c.header.chunk_size).min(size),
                volumes: volumes.get(&c.dir).copied().unwrap_or(0),
                last_read: last_read.filter(|t| *t > 0),
            };
            // Two caches of one URL (other manifests): the one holding more speaks for it.
            match images.get(&report.url) {
                Some(r) if r.cached_bytes >= report.cached_bytes => {}
                _ => {
                    images.insert(report.url.clone(), report);
                }
            }
        }
        seen.retain(|k, _| still.contains(k));
        drop(seen);
        let cache_free_bytes = match self.cfg.cache_limit {
            Some(limit) => limit.saturating_sub(used),
            None => lazy_image_attach::statvfs(&self.cfg.cache_dir).map_or(0, |st| st.f_bavail.saturating_mul(st.f_frsize)),
        };
        NodeReport { images, cache_free_bytes, failed_orders }
    }
}
