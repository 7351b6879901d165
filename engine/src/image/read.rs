//! Reading: a read split into cached chunks and runs to fetch (claimed once however many
//! readers want them), and the first misses after an attach widened over nearby metadata.

use super::*;

impl Inner {
    pub(super) fn chunk_range(&self, c: u64) -> (u64, u64) {
        let start = c * self.chunk_size;
        (start, (start + self.chunk_size).min(self.info.size))
    }

    /// Fills `out[..n]` with the image's bytes at `offset`, where `n` is `out.len()` shortened at
    /// the end of the image; returns `n`.
    pub(super) async fn read_into(self: &Arc<Self>, offset: u64, out: &mut [u8], allow_readahead: bool) -> Result<usize> {
        if offset >= self.info.size || out.is_empty() {
            return Ok(0);
        }
        let end = offset.saturating_add(out.len() as u64).min(self.info.size);
        let (c0, c1) = (offset / self.chunk_size, (end - 1) / self.chunk_size);
        let ahead = if allow_readahead { self.readahead_range(offset, end) } else { None };

        let mut plan = Vec::with_capacity((c1 - c0 + 1) as usize);
        let mut new_runs = Vec::new();
        {
            let mut st = lock(&self.state);
            let mut claim_from: Option<u64> = None;
            let (mut hits, mut misses) = (0, 0);
            for c in c0..=c1 {
                if st.present.get(c) {
                    hits += 1;
                    plan.push(Slot::Cache);
                } else if let Some(f) = st.inflight.get(&c) {
                    // Fetched and verified, its cache write still running: served from memory.
                    if matches!(f.fut.peek(), Some(Ok(_))) {
                        hits += 1;
                    } else {
                        misses += 1;
                    }
                    plan.push(Slot::Wait(f.clone()));
                } else {
                    misses += 1;
                    claim_from.get_or_insert(c);
                    plan.push(Slot::Cache); // replaced below once the run exists
                }
                let run_ends = claim_from.is_some() && (c == c1 || st.present.get(c + 1) || st.inflight.contains_key(&(c + 1)));
                if run_ends {
                    if let Some(first) = claim_from.take() {
                        let (a, b) = if first == c0 && c == c1 { self.widen_startup_miss(&st, first, c + 1) } else { (first, c + 1) };
                        for f in self.claim_runs(&mut st, a, b, RunKind::Demand) {
                            for k in f.0.max(c0)..f.1.min(c1 + 1) {
                                plan[(k - c0) as usize] = Slot::Wait(f.2.clone());
                            }
                            new_runs.push(f.2.fut);
                        }
                    }
                }
            }
            self.stats.count_chunks(hits, misses);
        }
        // A read that waits on one new run and nothing else drives that run itself: spawning it
        // would wake another runtime worker on the way to the origin. Should this read be
        // dropped before the run ends, the guard hands the run to the runtime.
        let lone = new_runs.len() == 1 && plan.iter().all(|s| matches!(s, Slot::Wait(f) if f.fut.ptr_eq(&new_runs[0])));
        // Other runs' bytes are taken as they arrive (checked chunk by chunk for a verified
        // image); a run this read drives is awaited whole: it is its own, and small.
        let stream = !lone;
        let _driver = if lone {
            DriveIfDropped { run: new_runs.pop(), rt: &self.rt }
        } else {
            for f in new_runs {
                tokio::spawn(f);
            }
            DriveIfDropped { run: None, rt: &self.rt }
        };
        if let Some((a, b)) = ahead {
            self.start_readahead(a, b);
        }

        let mut i = 0usize;
        while i < plan.len() {
            let c = c0 + i as u64;
            match &plan[i] {
                Slot::Cache => {
                    let mut j = i + 1;
                    while j < plan.len() && matches!(plan[j], Slot::Cache) {
                        j += 1;
                    }
                    let a = (c * self.chunk_size).max(offset);
                    let b = self.chunk_range(c0 + j as u64 - 1).1.min(end);
                    self.read_present(&mut out[(a - offset) as usize..(b - offset) as usize], a)?;
                    i = j;
                }
                Slot::Wait(f) => {
                    // The chunks from here on that the same run holds, as one piece.
                    let mut j = i + 1;
                    while j < plan.len() && matches!(&plan[j], Slot::Wait(g) if g.fut.ptr_eq(&f.fut)) {
                        j += 1;
                    }
                    let a = (c * self.chunk_size).max(offset);
                    let b = self.chunk_range(c0 + j as u64 - 1).1.min(end);
                    let base = f.first * self.chunk_size;
                    let dst = &mut out[(a - offset) as usize..(b - offset) as usize];
                    let streamed = stream && f.fill.wait_for((b - base) as usize).await && f.fill.copy_to((a - base) as usize, dst);
                    if !streamed {
                        let run = f.fut.clone().await?;
                        if let Some(bad) = (c..c0 + j as u64).find(|k| run.bad.contains(k)) {
                            let (cs, ce) = self.chunk_range(bad);
                            return Err(Error::new(
                                ErrorKind::Integrity,
                                format!("{}: chunk {bad} (bytes {cs}..{ce}) does not match the manifest", self.source.describe()),
                            ));
                        }
                        dst.copy_from_slice(&run.data[(a - base) as usize..(b - base) as usize]);
                    }
                    if served_whole(&f.served, (b - a) as usize, f.fill.len()) {
                        // Read whole: a reader waiting on it may finish after its write did.
                        lock(&self.recent).retain(|r| !Arc::ptr_eq(&r.run.served, &f.served));
                    }
                    i = j;
                }
            }
        }
        Ok((end - offset) as usize)
    }

    /// The run to fetch for a read whose chunks `[first, end)` are all missing: while the attach
    /// is young (its first `startup_misses` such reads), the free chunks around it up to the
    /// aligned `STARTUP_SPAN` come along. A mount, `ls` and the first opens read filesystem
    /// metadata that lies close together: ext4's root and `etc` directory blocks 24 KiB apart
    /// were two round trips. Costs at most `startup_misses` spans per attach.
    pub(super) fn widen_startup_miss(&self, st: &State, first: u64, end: u64) -> (u64, u64) {
        let per = STARTUP_SPAN / self.chunk_size;
        if per <= 1 || self.startup_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_err() {
            return (first, end);
        }
        let (lo, hi) = (first / per * per, end.div_ceil(per).saturating_mul(per).min(self.chunks));
        let free = |c: u64| !st.present.get(c) && !st.inflight.contains_key(&c);
        let (mut a, mut b) = (first, end);
        while a > lo && free(a - 1) {
            a -= 1;
        }
        while b < hi && free(b) {
            b += 1;
        }
        self.stats.count_readahead((first - a) + (b - end));
        (a, b)
    }

    /// Claims the chunks in `[r0, r1)` that are neither present nor in flight, as runs for the
    /// readahead or the demand pool, and returns their futures for the caller to spawn.
    pub(super) fn claim_missing(self: &Arc<Self>, r0: u64, r1: u64, kind: RunKind) -> Vec<RunFuture> {
        let mut runs = Vec::new();
        let mut claimed = 0;
        {
            let mut st = lock(&self.state);
            let mut c = r0;
            while c < r1 {
                if st.present.get(c) || st.inflight.contains_key(&c) {
                    c += 1;
                    continue;
                }
                let mut e = c;
                while e < r1 && !st.present.get(e) && !st.inflight.contains_key(&e) {
                    e += 1;
                }
                claimed += e - c;
                runs.extend(self.claim_runs(&mut st, c, e, kind).into_iter().map(|r| r.2.fut));
                c = e;
            }
        }
        if kind.readahead_pool() {
            self.stats.count_readahead(claimed);
        } else {
            self.stats.count_chunks(0, claimed);
        }
        runs
    }

    /// Splits chunks `[first, end)` into runs of at most `max_request` bytes, registers each as in
    /// flight and returns (first, end, future) per run. The caller spawns the futures.
    pub(super) fn claim_runs(self: &Arc<Self>, st: &mut State, first: u64, end: u64, kind: RunKind) -> Vec<(u64, u64, InFlight)> {
        let per = (self.cfg.max_request / self.chunk_size).max(1);
        let mut out = Vec::new();
        let mut a = first;
        while a < end {
            let b = (a + per).min(end);
            let me = self.clone();
            let fill = Filling::new((self.chunk_range(b - 1).1 - a * self.chunk_size) as usize, self.chunk_check(a));
            let served = Arc::new(AtomicUsize::new(0));
            let (f2, s2) = (fill.clone(), served.clone());
            let fut: RunFuture = async move { me.fetch_run(a, b, kind, f2, s2).await }.boxed().shared();
            let flight = InFlight { fut, first: a, fill, served };
            for c in a..b {
                st.inflight.insert(c, flight.clone());
            }
            out.push((a, b, flight));
            a = b;
        }
        out
    }

    /// Reads bytes whose chunks are present: from a recent run when memory holds them all (the
    /// cache file would go to the disk for them), else from the cache file.
    pub(super) fn read_present(&self, dst: &mut [u8], at: u64) -> Result<()> {
        if self.copy_recent(at, dst) {
            return Ok(());
        }
        self.store.read_at(dst, at)
    }
}
