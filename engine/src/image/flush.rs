//! Flushing: the bitmap made durable after the data it marks, the counters written beside it,
//! on a timer and at close.

use super::*;

/// Flushes every `every` while the image is open.
pub(super) async fn flusher(weak: Weak<Inner>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = weak.upgrade() else { return };
        inner.expire_recent();
        crate::cache::trim_idle_buffers();
        if let Err(e) = inner.clone().flush().await {
            tracing::warn!(error = %e.report(), "persisting cache state failed");
        }
        inner.check_blob().await;
    }
}

impl Inner {
    /// Once every chunk is cached, hashes the cache file against `cfg.blob_digest` (once per
    /// open). A mismatch marks the image bad, drops what the cache holds and fails reads.
    pub(super) async fn check_blob(self: &Arc<Self>) {
        let Some(want) = self.cfg.blob_digest.clone() else { return };
        if lock(&self.state).present.count_ones() != self.chunks {
            return;
        }
        if self.blob_check.compare_exchange(BLOB_UNCHECKED, BLOB_CHECKING, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return;
        }
        let (path, size) = (self.store.data_path(), self.info.size);
        let got = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            use sha2::Digest;
            use std::io::Read;
            let mut f = std::fs::File::open(path)?.take(size);
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(format!("sha256:{}", hex::encode(h.finalize())))
        })
        .await;
        match got {
            Ok(Ok(d)) if d == want => {
                self.blob_check.store(BLOB_GOOD, Ordering::SeqCst);
                tracing::info!(image = %self.source.describe(), digest = %want, "the whole blob matches its digest");
            }
            Ok(Ok(d)) => {
                let msg = format!("{}: the whole blob hashes to {d}, not its digest {want}: its cache was dropped", self.source.describe());
                tracing::error!("{msg}");
                lock(&self.health).fatal.get_or_insert(format!("{}: {msg}", ErrorKind::Integrity));
                self.blob_check.store(BLOB_BAD, Ordering::SeqCst);
                let empty = Bitmap::new(self.chunks);
                lock(&self.state).present = empty.clone();
                if let Err(e) = self.store.persist(&empty) {
                    tracing::warn!(error = %e.report(), "dropping a bad blob's cache");
                }
            }
            // Not checked this time (the file could not be read): the next round tries again.
            _ => self.blob_check.store(BLOB_UNCHECKED, Ordering::SeqCst),
        }
    }

    pub(super) fn stats_snapshot(&self) -> StatsSnapshot {
        let mut s = self.stats.snapshot();
        s.recent_bytes = lock(&self.recent).iter().map(|r| r.run.data.len() as u64).sum();
        s
    }

    pub(super) async fn flush(self: Arc<Self>) -> Result<()> {
        // Held by the blocking work itself: a flush dropped while it runs still keeps the next out.
        let one = self.flushing.clone().lock_owned().await;
        let (snapshot, written) = {
            let mut st = lock(&self.state);
            ((st.written > st.synced).then(|| (st.present.clone(), std::mem::take(&mut st.unsynced))), st.written)
        };
        let me = self.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<()> {
            let _one = one;
            if let Some((bits, unsynced)) = &snapshot {
                if let Err(e) = me.store.persist(bits) {
                    me.forget(unsynced, &e);
                    return Err(e);
                }
            }
            let stats = serde_json::to_vec_pretty(&me.stats_snapshot()).unwrap_or_default();
            me.store.write_stats(&stats).map(drop)
        })
        .await
        .map_err(|e| Error::with_source(ErrorKind::CacheIo, "flush task", e))?;
        if res.is_ok() {
            let mut st = lock(&self.state);
            st.synced = st.synced.max(written);
        }
        res
    }
}
