//! Fetching a claimed run from the source (verified against the manifest when there is one),
//! within the room for cache writes, and writing its good chunks to the cache.

use super::*;

impl Inner {
    /// Fetches and verifies a run. Its readers get the bytes as they arrive (chunk by checked
    /// chunk for a verified image), or all at once when it ends; the cache write goes on behind
    /// them, and the chunks stay "in flight" (served from this run's
    /// bytes) until they are on disk and marked present.
    pub(super) async fn fetch_run(
        self: Arc<Self>,
        first: u64,
        end: u64,
        kind: RunKind,
        fill: Arc<Filling>,
        served: Arc<AtomicUsize>,
    ) -> Result<Run> {
        let (result, room) = match self.write_room(first, end, kind).await {
            Ok(room) => (self.fetch_verified(first, end, kind.readahead_pool(), &fill, served).await, room),
            Err(e) => (Err(e), None),
        };
        // Whole or failed, nothing more arrives: readers waiting on bytes stop waiting.
        fill.close();
        match &result {
            Ok(run) => {
                lock(&self.health).transient = None;
                // Chunks that failed verification are not written: the next read refetches them.
                if !run.bad.is_empty() {
                    let mut st = lock(&self.state);
                    for c in &run.bad {
                        st.inflight.remove(c);
                    }
                }
                self.writes_pending.fetch_add(1, Ordering::SeqCst);
                let (me, run) = (self.clone(), run.clone());
                let write = move || {
                    // A panicking write must still release its chunks and `settle`.
                    let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.write_good_chunks(&run, kind.direct())))
                        .unwrap_or_else(|_| {
                            me.stats.count_cache_write_error();
                            tracing::warn!("cache write panicked; serving from memory");
                            false
                        });
                    if written && kind.kept_for_reader() && run.bad.is_empty() {
                        me.keep_recent(run.clone());
                    }
                    {
                        let mut st = lock(&me.state);
                        for c in (first..end).filter(|c| !run.bad.contains(c)) {
                            st.inflight.remove(&c);
                            if written {
                                st.present.set(c);
                            }
                        }
                        st.written += written as u64;
                        if written {
                            st.unsynced.push((first, end));
                        }
                    }
                    drop(room);
                    me.writes_pending.fetch_sub(1, Ordering::SeqCst);
                    me.writes_done.notify_waiters();
                };
                // The write goes to a blocking thread. A reader's own run is mostly driven by that
                // reader's task, which answers once this returns: woken now, the writing thread
                // took the CPU from it (the wakee preempts), and the reader was answered after
                // the write's system call. Started from a task queued behind the reader's own
                // (the worker's next-task slot: no other thread woken), it comes after the answer.
                // Read-ahead and fill runs end on tasks nobody is answered from, and a task in
                // between only cost them: their writes go straight to the thread.
                if matches!(kind, RunKind::Demand) && tokio::task::try_id().is_some() {
                    let rt = self.rt.clone();
                    self.rt.spawn(async move {
                        rt.spawn_blocking(write);
                    });
                } else {
                    self.rt.spawn_blocking(write);
                }
            }
            Err(e) => {
                {
                    let mut st = lock(&self.state);
                    for c in first..end {
                        st.inflight.remove(&c);
                    }
                }
                let mut h = lock(&self.health);
                let msg = e.report();
                if matches!(e.kind(), ErrorKind::OriginChanged | ErrorKind::Integrity) {
                    h.fatal.get_or_insert(msg);
                } else {
                    h.transient = Some(msg);
                }
            }
        }
        result
    }

    /// Room in `write_room` for the run `[first, end)` until its cache write ends. A reader's
    /// own fetch takes it only if it is free: readers never wait on the cache disk.
    pub(super) async fn write_room(&self, first: u64, end: u64, kind: RunKind) -> Result<Option<OwnedSemaphorePermit>> {
        let total = room_kib(self.cfg.write_behind, u64::MAX) as u64;
        let kib = room_kib(self.chunk_range(end - 1).1 - first * self.chunk_size, total);
        if kind == RunKind::Demand {
            return Ok(self.write_room.clone().try_acquire_many_owned(kib).ok());
        }
        let permit = self.write_room.clone().acquire_many_owned(kib).await;
        permit.map(Some).map_err(|e| Error::with_source(ErrorKind::CacheIo, "write room closed", e))
    }

    pub(super) async fn fetch_verified(
        &self,
        first: u64,
        end: u64,
        readahead: bool,
        fill: &Arc<Filling>,
        served: Arc<AtomicUsize>,
    ) -> Result<Run> {
        let slots = if readahead { &self.readahead_slots } else { &self.demand_slots };
        let _permit = slots.acquire().await.map_err(|e| Error::with_source(ErrorKind::CacheIo, "fetch slots closed", e))?;
        let offset = first * self.chunk_size;
        let len = self.chunk_range(end - 1).1 - offset;
        self.fetch_into(offset, len, fill).await?;
        // Checked as they arrived (none without a manifest).
        let (mut data, mut bad) = (fill.bytes(), fill.bad_chunks());
        if !bad.is_empty() {
            // One more try from the origin: a flipped bit in transit should not fail the read.
            // Into a buffer of its own: readers may hold bytes of the first.
            self.stats.count_verify_failure();
            tracing::warn!(image = %self.source.describe(), chunks = ?bad, "chunks failed verification; refetching once");
            let again = Filling::new(len as usize, self.chunk_check(first));
            self.fetch_into(offset, len, &again).await?;
            (data, bad) = (again.bytes(), again.bad_chunks());
            if !bad.is_empty() {
                self.stats.count_verify_failure();
                let msg = format!("{}: chunks {bad:?} do not match the manifest after a refetch", self.source.describe());
                tracing::error!("{msg}");
                lock(&self.health).fatal.get_or_insert(format!("{}: {msg}", ErrorKind::Integrity));
            }
        }
        Ok(Run::new(first, data, bad, served))
    }

    pub(super) async fn fetch_into(&self, offset: u64, len: u64, fill: &Filling) -> Result<()> {
        let t = Instant::now();
        self.source.fetch_to(offset, len, &self.info, fill).await?;
        self.stats.count_fetch(len, t.elapsed());
        Ok(())
    }

    /// The manifest check of a run starting at chunk `first`, for a verified image.
    pub(super) fn chunk_check(&self, first: u64) -> Option<ChunkCheck> {
        self.manifest.clone().map(|manifest| ChunkCheck { manifest, first, chunk_size: self.chunk_size as usize })
    }

    /// Writes the run's verified chunks to the cache file (blocking). False if nothing could be
    /// cached (full, or an I/O error): readers still get the bytes, the chunks just stay missing.
    pub(super) fn write_good_chunks(&self, run: &Run, direct: bool) -> bool {
        let res = if run.bad.is_empty() {
            self.store.write_at(&run.data, run.first * self.chunk_size, direct)
        } else {
            // Rare path: write only the good chunks; a bad one must never reach the cache.
            let base = run.first * self.chunk_size;
            let end = run.first + run.data.len().div_ceil(self.chunk_size as usize) as u64;
            (run.first..end).filter(|c| !run.bad.contains(c)).try_fold(true, |ok, c| {
                let (a, b) = self.chunk_range(c);
                Ok(ok && self.store.write_at(&run.data[(a - base) as usize..(b - base) as usize], a, direct)?)
            })
        };
        match res {
            Ok(written) => {
                if written && lock(&self.health).cache.take().is_some() {
                    tracing::info!(dir = %self.store.dir().display(), "cache writes succeed again");
                }
                written
            }
            Err(e) => {
                self.stats.count_cache_write_error();
                let msg = format!("{}; misses are served without being cached", e.report());
                // Logged once per spell: on a full disk every write fails.
                if lock(&self.health).cache.replace(msg.clone()).is_none() {
                    tracing::warn!("{msg}");
                }
                false
            }
        }
    }

    /// Marks the chunks of `ranges` missing again after the sync that was to make them durable
    /// failed with `e`: they are fetched again rather than read from data the disk may not hold.
    pub(super) fn forget(&self, ranges: &[(u64, u64)], e: &Error) {
        let mut n = 0;
        {
            let mut st = lock(&self.state);
            for c in ranges.iter().flat_map(|&(a, b)| a..b) {
                if st.present.get(c) {
                    st.present.clear(c);
                    n += 1;
                }
            }
        }
        self.store.release(n * self.chunk_size);
        let msg = format!("{}; {n} chunks written since the last sync will be fetched again", e.report());
        tracing::warn!("{msg}");
        lock(&self.health).cache = Some(msg);
    }
}
