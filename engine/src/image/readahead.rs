//! Read-ahead: sequential readers grow a window of fetches ahead of them.

use super::*;

impl Inner {
    /// Claims the chunks of `[a, b)` that are neither present nor in flight and starts fetching
    /// them through the readahead pool.
    pub(super) fn start_readahead(self: &Arc<Self>, a: u64, b: u64) {
        let (r0, r1) = (a / self.chunk_size, b.div_ceil(self.chunk_size).min(self.chunks));
        for f in self.claim_missing(r0, r1, RunKind::Readahead) {
            self.rt.spawn(f);
        }
    }

    /// Tracks up to eight sequential streams; a read that continues one grows its window and
    /// returns the not-yet-requested range ahead of it.
    pub(super) fn readahead_range(&self, offset: u64, end: u64) -> Option<(u64, u64)> {
        const STREAMS: usize = 8;
        if self.cfg.readahead_max == 0 {
            return None;
        }
        let slack = self.cfg.readahead_initial.max(self.chunk_size);
        let mut streams = lock(&self.streams);
        // A read belongs to a stream anywhere from just behind its next offset to just past what
        // was fetched ahead of it. The reach grows with the window and with the read's size: the
        // loop device sends several 1 MiB reads at once and they reach us slightly out of order,
        // which with a fixed 512 KiB reach started a new stream (and a small window) every time
        // one overtook another.
        let reach = |s: &Stream| slack.max(s.window).max(4 * (end - offset));
        let hit = streams.iter().position(|s| offset + reach(s) >= s.next && offset <= s.frontier.max(s.next) + reach(s));
        let Some(i) = hit else {
            if streams.len() == STREAMS {
                streams.pop();
            }
            streams.insert(0, Stream { next: end, window: 0, frontier: end, hits: 0 });
            return None;
        };
        let mut s = streams.remove(i);
        s.next = s.next.max(end);
        s.hits = s.hits.saturating_add(1);
        let large = end - offset >= LARGE_READ;
        if s.hits < 2 && !large {
            streams.insert(0, s);
            return None;
        }
        // Extend in whole windows once less than half a window is left ahead, so requests stay
        // large instead of one chunk per small read. At the full window, top up as soon as a
        // whole request fits: waiting for half a window let every request in flight end before
        // the next were claimed, and then all started together, leaving the origin idle for a
        // round trip each time.
        let ahead = s.frontier.saturating_sub(end);
        let top_up = s.window == self.cfg.readahead_max && ahead + self.cfg.max_request <= s.window;
        if s.window > 0 && ahead >= s.window / 2 && !top_up {
            streams.insert(0, s);
            return None;
        }
        let first = if large { LARGE_READ_WINDOWS * (end - offset) } else { 0 };
        s.window = (s.window * 2).max(first).clamp(self.cfg.readahead_initial, self.cfg.readahead_max);
        let from = s.frontier.max(end);
        let to = (end + s.window).min(self.info.size);
        s.frontier = s.frontier.max(to);
        streams.insert(0, s);
        (from < to).then_some((from, to))
    }
}
