//! Read-ahead runs kept in memory, after their direct cache write, for the reader they were
//! fetched ahead of.

use super::*;

impl Inner {
    /// Remembers a read-ahead run, just written around the page cache, for `copy_recent`. Kept
    /// at most `RECENT_TTL`, and at most twice the readahead window in all: the window is how
    /// far ahead of its reader a run lands.
    pub(super) fn keep_recent(&self, run: Run) {
        let mut recent = lock(&self.recent);
        if run.read_whole() {
            return;
        }
        recent.push_back(Recent { run, at: Instant::now() });
        let limit = (2 * self.cfg.readahead_max).max(self.cfg.max_request) as usize;
        drop_expired(&mut recent);
        let mut total: usize = recent.iter().map(|r| r.run.data.len()).sum();
        while total > limit {
            let Some(old) = recent.pop_front() else { break };
            total -= old.run.data.len();
        }
    }

    /// Drops recent runs past `RECENT_TTL` (their reader went away).
    pub(super) fn expire_recent(&self) {
        drop_expired(&mut lock(&self.recent));
    }

    /// Fills `out` with the image's bytes at `offset` from recent runs, if they hold all of it.
    /// Callers ask only for cached chunks, and a recent run holds exactly the bytes written.
    pub(super) fn copy_recent(&self, offset: u64, out: &mut [u8]) -> bool {
        let end = offset + out.len() as u64;
        let mut pieces = Vec::new();
        {
            let mut recent = lock(&self.recent);
            if recent.is_empty() {
                return false;
            }
            let mut at = offset;
            while at < end {
                let span = |r: &Recent| (r.run.first * self.chunk_size, r.run.first * self.chunk_size + r.run.data.len() as u64);
                let Some(i) = recent.iter().rposition(|r| span(r).0 <= at && at < span(r).1) else {
                    return false;
                };
                let (base, run_end) = span(&recent[i]);
                let upto = end.min(run_end);
                pieces.push((i, recent[i].run.data.slice((at - base) as usize..(upto - base) as usize), (at - offset) as usize));
                at = upto;
            }
            // Counted only once the whole range was found.
            for (i, bytes, _) in &pieces {
                recent[*i].run.count_served(bytes.len());
            }
            recent.retain(|r| !r.run.read_whole());
        }
        // The copies run outside the lock: other queues' readers need it too.
        for (_, bytes, at) in pieces {
            out[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        true
    }
}
