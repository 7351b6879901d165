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
        if let Err(e) = inner.flush().await {
            tracing::warn!(error = %e.report(), "persisting cache state failed");
        }
    }
}

impl Inner {
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
