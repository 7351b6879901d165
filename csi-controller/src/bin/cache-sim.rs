//! `lazy-image-cache-sim`: simulates the node cache report channel of a large cluster (1,000
//! nodes x 200 images by default) in virtual time, with the real report policy (nodes write when
//! what placement acts on changed, at most every minute, a heartbeat every 15 min) and the
//! controller's write pacer, and prints the API writes per second: in steady state, and while
//! one image is warmed onto every node. A benchmark, not a test: figures go to the README.

use clap::Parser;
use lazy_image_csi_common::reports::{Decision, ImageReport, NodeReport, Pacer, ReportPolicy};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "lazy-image-cache-sim", about = "API writes of node cache reports in a simulated cluster")]
struct Args {
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[arg(long, default_value_t = 200)]
    images: usize,
    /// Images each node holds in steady state.
    #[arg(long, default_value_t = 20)]
    per_node: usize,
    /// Simulated steady state, seconds.
    #[arg(long, default_value_t = 7200)]
    steady_s: u64,
    /// Mean seconds between a node's volume mounts or unmounts.
    #[arg(long, default_value_t = 900)]
    mount_every_s: u64,
    /// Mean seconds between a node starting to fill a new image (and dropping an old one).
    #[arg(long, default_value_t = 3600)]
    new_image_every_s: u64,
    /// The warmed image's size, GiB, and the nodes' fill rate range, MB/s.
    #[arg(long, default_value_t = 20)]
    warm_gib: u64,
    #[arg(long, default_value_t = 100)]
    fill_min_mbs: u64,
    #[arg(long, default_value_t = 300)]
    fill_max_mbs: u64,
    /// The controller's write pacing: writes per second and burst.
    #[arg(long, default_value_t = 10.0)]
    controller_rate: f64,
    #[arg(long, default_value_t = 20.0)]
    controller_burst: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// A small deterministic generator: the same seed, the same run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    /// True with probability 1/n.
    fn one_in(&mut self, n: u64) -> bool {
        n > 0 && self.next().is_multiple_of(n)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

struct Node {
    report: NodeReport,
    written: Option<NodeReport>,
    /// Second of the last write; before 0 for the nodes' writes before the simulation began.
    written_at: i64,
    /// Images filling: url -> bytes per second.
    filling: BTreeMap<String, u64>,
}

/// Counts writes per second of virtual time.
#[derive(Default)]
struct Writes {
    per_second: Vec<u64>,
}

impl Writes {
    fn add(&mut self, t: u64) {
        let t = t as usize;
        if self.per_second.len() <= t {
            self.per_second.resize(t + 1, 0);
        }
        self.per_second[t] += 1;
    }
    fn mean(&self, from: u64, to: u64) -> f64 {
        let s: u64 = (from..to).map(|t| self.per_second.get(t as usize).copied().unwrap_or(0)).sum();
        s as f64 / (to - from).max(1) as f64
    }
    fn peak(&self, from: u64, to: u64, window: u64) -> f64 {
        (from..to.saturating_sub(window)).map(|t| self.mean(t, t + window)).fold(0.0, f64::max)
    }
}

fn url(i: usize) -> String {
    format!("https://images.example/img-{i}.erofs")
}

fn main() {
    let a = Args::parse();
    let policy = ReportPolicy::default();
    let mut rng = Rng(a.seed);
    let gib = 1u64 << 30;
    let mut nodes: Vec<Node> = (0..a.nodes)
        .map(|_| {
            let mut images = BTreeMap::new();
            while images.len() < a.per_node.min(a.images) {
                let i = rng.range(0, a.images as u64 - 1) as usize;
                let size = rng.range(1, 40) * gib;
                let r = ImageReport { url: url(i), size_bytes: size, cached_bytes: size, volumes: rng.range(0, 2) as u32, last_read: None };
                images.insert(url(i), r);
            }
            // Running for a while already: its last write (and so its next heartbeat) at a random
            // point of the last heartbeat period.
            let report = NodeReport { images, cache_free_bytes: 200 * gib, ..NodeReport::default() };
            let written_at = -(rng.range(0, ReportPolicy::default().heartbeat.as_secs() - 1) as i64);
            Node { written: Some(report.clone()), report, written_at, filling: BTreeMap::new() }
        })
        .collect();
    let mut writes = Writes::default();
    let mut pacer = Pacer::new(a.controller_rate, a.controller_burst);
    // The controller writes an image's status when its aggregate changed, at most every 60 s.
    let mut status_due: BTreeMap<String, u64> = BTreeMap::new();
    let mut status_written: BTreeMap<String, u64> = BTreeMap::new();

    let warm_at = a.steady_s;
    let warm_url = "https://images.example/warm-me.erofs".to_string();
    let end = warm_at + 1800;
    let mut ordered = 0usize;
    let mut warm_done_at = None;
    for t in 0..end {
        let now = Duration::from_secs(t);
        // The controller: at warm_at it orders every node to warm one image, paced.
        if t >= warm_at {
            while ordered < nodes.len() && pacer.take(now).is_ok() {
                writes.add(t);
                let n = &mut nodes[ordered];
                let size = a.warm_gib * gib;
                n.report.images.insert(
                    warm_url.clone(),
                    ImageReport { url: warm_url.clone(), size_bytes: size, cached_bytes: 0, volumes: 0, last_read: None },
                );
                n.filling.insert(warm_url.clone(), rng.range(a.fill_min_mbs, a.fill_max_mbs) << 20);
                ordered += 1;
            }
        }
        for n in nodes.iter_mut() {
            // What happens on the node: fills progress, reads (no write), mounts, new images.
            let mut done = Vec::new();
            for (u, rate) in &n.filling {
                if let Some(r) = n.report.images.get_mut(u) {
                    r.cached_bytes = (r.cached_bytes + rate).min(r.size_bytes);
                    if r.cached_bytes == r.size_bytes {
                        done.push(u.clone());
                    }
                }
            }
            for u in done {
                n.filling.remove(&u);
                status_due.entry(u).or_insert(t);
            }
            if let Some(r) = n.report.images.values_mut().next() {
                r.last_read = Some(t);
            }
            if t < warm_at && rng.one_in(a.mount_every_s) {
                let k = rng.range(0, n.report.images.len() as u64 - 1) as usize;
                if let Some(r) = n.report.images.values_mut().nth(k) {
                    r.volumes = if r.volumes == 0 { 1 } else { r.volumes - 1 };
                }
            }
            if t < warm_at && rng.one_in(a.new_image_every_s) {
                let old = n.report.images.keys().next().cloned();
                if let Some(old) = old {
                    n.report.images.remove(&old);
                    status_due.entry(old).or_insert(t);
                }
                let i = rng.range(0, a.images as u64 - 1) as usize;
                let size = rng.range(1, 40) * gib;
                n.report
                    .images
                    .insert(url(i), ImageReport { url: url(i), size_bytes: size, cached_bytes: 0, volumes: 1, last_read: Some(t) });
                n.filling.insert(url(i), rng.range(a.fill_min_mbs, a.fill_max_mbs) << 20);
            }
            let since = Duration::from_secs((t as i64 - n.written_at).max(0) as u64);
            if policy.decide(&n.report, n.written.as_ref(), since) == Decision::Write {
                writes.add(t);
                n.written = Some(n.report.clone());
                n.written_at = t as i64;
            }
        }
        // The controller's status writes: per image, when due and a minute after the last.
        let due: Vec<String> =
            status_due.iter().filter(|(u, _)| status_written.get(*u).is_none_or(|w| t >= w + 60)).map(|(u, _)| u.clone()).collect();
        for u in due {
            if pacer.take(now).is_err() {
                break;
            }
            writes.add(t);
            status_due.remove(&u);
            status_written.insert(u, t);
        }
        if t >= warm_at && warm_done_at.is_none() && ordered == nodes.len() && nodes.iter().all(|n| !n.filling.contains_key(&warm_url)) {
            warm_done_at = Some(t);
        }
    }
    let settle = 900.min(a.steady_s / 2);
    println!(
        "simulated {} nodes x {} images ({} per node), report policy: min interval {} s, heartbeat {} s; controller pacing {}/s, burst {}",
        a.nodes,
        a.images,
        a.per_node,
        policy.min_interval.as_secs(),
        policy.heartbeat.as_secs(),
        a.controller_rate,
        a.controller_burst
    );
    println!(
        "steady state ({} s after {} s to settle): {:.2} writes/s mean, {:.2} writes/s in the busiest minute (goal: under 5)",
        a.steady_s - settle,
        settle,
        writes.mean(settle, a.steady_s),
        writes.peak(settle, a.steady_s, 60)
    );
    let done = warm_done_at.unwrap_or(end);
    println!(
        "warm-up of one {} GiB image onto {} nodes: done in {} s; {:.2} writes/s mean, {:.2} writes/s in the busiest 10 s (goal: under 50)",
        a.warm_gib,
        a.nodes,
        done - warm_at,
        writes.mean(warm_at, done + 1),
        writes.peak(warm_at, done + 1, 10)
    );
}
