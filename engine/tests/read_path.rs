//! Read-path behaviour against the in-memory fault-injecting source.

mod common;

use common::{config, open, pattern};
use lazy_image_engine::source::Fault;
use lazy_image_engine::{ErrorKind, FakeSource, FileSource, ImageConfig, LazyImage, Manifest};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

const SIZE: usize = 1 << 20;

#[tokio::test]
async fn suite_fake_source() {
    let data = pattern(SIZE + 123, 1);
    common::source_suite(Arc::new(FakeSource::new(data.clone())), &data).await;
}

#[tokio::test]
async fn suite_file_source() {
    let data = pattern(SIZE + 77, 2);
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &data).unwrap();
    common::source_suite(Arc::new(FileSource::open(f.path()).unwrap()), &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_misses_on_one_chunk_fetch_once() {
    let src = Arc::new(FakeSource::new(pattern(SIZE, 3)));
    src.inject(Fault::Delay(std::time::Duration::from_millis(50)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.readahead_max = 0;
    let img = LazyImage::open(src.clone(), cfg).await.unwrap();
    let before = src.fetch_count();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let img = img.clone();
            tokio::spawn(async move { img.read(500_000 + i, 100).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(src.fetch_count() - before, 1, "single-flight");
}

#[tokio::test]
async fn adjacent_missing_chunks_are_one_request() {
    let src = Arc::new(FakeSource::new(pattern(SIZE, 4)));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    let before = src.fetch_count();
    img.read(100 * 4096 + 10, 8 * 4096).await.unwrap();
    assert_eq!(src.fetch_count() - before, 1);
    assert_eq!(src.bytes_count(), 9 * 4096);
}

#[tokio::test]
async fn first_misses_after_attach_fetch_their_neighbourhood() {
    let data = pattern(SIZE, 22);
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().unwrap();
    // Chunk 40 (160..164 KiB) cached by an earlier attach.
    let img = LazyImage::open(src.clone(), config(dir.path())).await.unwrap();
    img.read(40 * 4096 + 10, 10).await.unwrap();
    img.close().await.unwrap();
    let mut cfg = config(dir.path());
    cfg.startup_misses = 2;
    let img = LazyImage::open(src.clone(), cfg).await.unwrap();
    let (fetches, bytes) = (src.fetch_count(), src.bytes_count());
    // First miss: the free chunks of its aligned 64 KiB (128..192 KiB) up to the cached one.
    assert_eq!(&img.read(35 * 4096, 100).await.unwrap()[..], &data[35 * 4096..35 * 4096 + 100]);
    assert_eq!((src.fetch_count() - fetches, src.bytes_count() - bytes), (1, 32 << 10));
    // Second: the whole 64 KiB around it in one request; a neighbour then costs nothing.
    assert_eq!(&img.read(70_000, 100).await.unwrap()[..], &data[70_000..70_100]);
    assert_eq!(&img.read(120_000, 5000).await.unwrap()[..], &data[120_000..125_000]);
    assert_eq!((src.fetch_count() - fetches, src.bytes_count() - bytes), (2, 96 << 10));
    // The budget is spent: a miss fetches its own chunk only.
    assert_eq!(&img.read(500_000, 10).await.unwrap()[..], &data[500_000..500_010]);
    assert_eq!(src.bytes_count() - bytes, (96 << 10) + 4096);
}

/// Reads `piece`-sized reads at `offsets` (which cover the image) and checks that readahead
/// turned them into a few large requests.
async fn assert_reads_grow_readahead(seed: u64, piece: u64, offsets: impl IntoIterator<Item = u64>) {
    let data = pattern(SIZE, seed);
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    for off in offsets {
        let got = img.read(off, piece).await.unwrap();
        assert_eq!(&got[..], &data[off as usize..(off + piece) as usize]);
    }
    let s = img.stats();
    assert!(s.readahead_chunks > 128, "readahead {s:?}");
    // Without readahead this is 256 requests of one chunk each.
    assert!(src.fetch_count() < 64, "requests: {}", src.fetch_count());
}

#[tokio::test]
async fn sequential_reads_grow_readahead() {
    assert_reads_grow_readahead(5, 4096, (0..SIZE as u64).step_by(4096)).await;
}

/// The loop device sends several reads at once and they arrive slightly out of order: a read
/// that overtakes the one before it still continues the stream.
#[tokio::test]
async fn sequential_reads_arriving_out_of_order_grow_readahead() {
    let piece = 32u64 << 10;
    let swapped_pairs = (0..SIZE as u64).step_by(2 * piece as usize).flat_map(|pair| [pair + piece, pair]);
    assert_reads_grow_readahead(6, piece, swapped_pairs).await;
}

type FastPath = fn(&LazyImage, u64, &mut [u8]) -> lazy_image_engine::Result<Option<usize>>;

/// The runtime-free fast path used by ublk queue threads: misses say so, hits return the image's
/// bytes, and a sequential reader that only ever hits keeps readahead running ahead of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_fast_path_serves_hits_and_keeps_readahead_going() {
    fast_path_serves_hits_and_keeps_readahead_going(LazyImage::read_cached_into).await;
}

/// The same for reads that must not wait even on the disk (compressed blocks decoded on a
/// backend's queue thread): pages of the cache file in memory are hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_fast_path_serves_hits_and_keeps_readahead_going() {
    fast_path_serves_hits_and_keeps_readahead_going(LazyImage::read_resident).await;
}

async fn fast_path_serves_hits_and_keeps_readahead_going(fast: FastPath) {
    let data = pattern(SIZE, 12);
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    let mut buf = vec![0u8; 4096];
    assert_eq!(fast(&img, 8192, &mut buf).unwrap(), None, "cold chunk is a miss");
    // Prime a stream so readahead is running, then read on from a thread with no runtime.
    for off in (0..64 * 1024u64).step_by(4096) {
        img.read(off, 4096).await.unwrap();
    }
    let img2 = img.clone();
    let data2 = data.clone();
    let (hits, fallbacks) = tokio::task::spawn_blocking(move || {
        let (mut hits, mut fallbacks) = (0, 0);
        let mut buf = vec![0u8; 4096];
        for off in (64 * 1024..SIZE as u64).step_by(4096) {
            loop {
                match fast(&img2, off, &mut buf).unwrap() {
                    Some(n) => {
                        assert_eq!(&buf[..n], &data2[off as usize..off as usize + n]);
                        hits += 1;
                        break;
                    }
                    // Not there yet: a real caller would hand the read to the runtime.
                    None => {
                        fallbacks += 1;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        }
        (hits, fallbacks)
    })
    .await
    .unwrap();
    assert_eq!(hits, (SIZE - 64 * 1024) / 4096);
    assert!(fallbacks < 200, "readahead kept ahead of the fast path ({fallbacks} waits)");
    // The tail is shortened at the end of the image (read once first: cache writes may skip
    // the page cache, which the resident path needs).
    img.read(SIZE as u64 - 4096, 4096).await.unwrap();
    let mut big = vec![0u8; 8192];
    assert_eq!(fast(&img, SIZE as u64 - 4096, &mut big).unwrap(), Some(4096));
}

/// Whether the engine's plan for a read at `off` serves it from memory (copied into `buf`).
fn in_memory(img: &LazyImage, off: u64, buf: &mut [u8]) -> bool {
    matches!(img.plan_read(off, buf), lazy_image_engine::ReadPlan::Copied(n) if n == buf.len())
}

/// Scattered reads, some landing near an earlier one by chance, must fetch only their own chunks.
/// Read-ahead runs wait in memory for their reader (their bytes go around the page cache), and
/// each leaves once its bytes were copied; a random miss is not kept.
#[tokio::test]
async fn readahead_runs_wait_in_memory_for_their_reader() {
    let data = pattern(SIZE, 16);
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src, dir.path()).await;
    let tail = SIZE as u64 - 8192;
    img.read(tail, 4096).await.unwrap();
    let step = 16u64 << 10;
    for off in (0..4 * step).step_by(step as usize) {
        img.read(off, step).await.unwrap();
    }
    // The run just past the reads lands in memory once written.
    let ahead = 4 * step;
    let mut buf = vec![0u8; 4096];
    let t = std::time::Instant::now();
    while !in_memory(&img, ahead, &mut buf) {
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "no read-ahead run kept");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(&buf[..], &data[ahead as usize..ahead as usize + 4096]);
    assert!(!in_memory(&img, tail, &mut buf), "a demand miss stays in the cache file only");
    // Copy on through what memory holds: each run copied whole is dropped.
    let mut at = ahead + 4096;
    while in_memory(&img, at, &mut buf) {
        assert_eq!(&buf[..], &data[at as usize..at as usize + 4096]);
        at += 4096;
    }
    assert!(at > ahead + 4096, "the run holds more than its first page");
    assert!(!in_memory(&img, ahead, &mut buf), "a run read whole is dropped");
    // The cache file has the bytes all the same.
    assert_eq!(&img.read(ahead, at - ahead).await.unwrap()[..], &data[ahead as usize..at as usize]);
    img.close().await.unwrap();
}

#[tokio::test]
async fn random_reads_do_not_trigger_readahead() {
    let size = 64 << 20;
    let data = pattern(size, 11);
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    let chunk = img.chunk_size();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for _ in 0..500 {
        let off = rng.gen_range(0..(size as u64 / 4096)) * 4096;
        let got = img.read(off, 4096).await.unwrap();
        assert_eq!(&got[..], &data[off as usize..off as usize + 4096]);
    }
    let s = img.stats();
    assert_eq!(s.readahead_chunks, 0, "{s:?}");
    assert!(s.origin_bytes <= s.chunk_misses * chunk, "{s:?}");
}

#[tokio::test]
async fn transient_errors_are_retried_and_counted() {
    let data = pattern(SIZE, 6);
    let src = Arc::new(FakeSource::new(data.clone()));
    src.inject(Fault::FailAt { offset: 200_000, times: 3, kind: ErrorKind::OriginStatus(503) });
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    let got = img.read(200_000, 10).await.unwrap();
    assert_eq!(&got[..], &data[200_000..200_010]);
    assert_eq!(img.stats().retries, 3);
    assert!(!img.condition().abnormal);
}

#[tokio::test]
async fn permanent_errors_are_not_retried() {
    let src = Arc::new(FakeSource::new(pattern(SIZE, 7)));
    src.inject(Fault::FailAt { offset: 300_000, times: 1, kind: ErrorKind::OriginStatus(404) });
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    let e = img.read(300_000, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OriginStatus(404));
    assert_eq!(img.stats().retries, 0);
    assert!(img.condition().abnormal);
    // The failure is not cached: the next read fetches again and succeeds.
    img.read(300_000, 10).await.unwrap();
    assert!(!img.condition().abnormal);
}

#[tokio::test]
async fn deadline_bounds_retries() {
    let src = Arc::new(FakeSource::new(pattern(SIZE, 8)));
    src.inject(Fault::FailAt { offset: 0, times: u32::MAX, kind: ErrorKind::Transport });
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.retry.deadline = std::time::Duration::from_millis(300);
    let err = match LazyImage::open(src, cfg).await {
        Ok(img) => img.read(0, 10).await.unwrap_err(),
        Err(e) => panic!("probe does not fetch: {e}"),
    };
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(err.kind().errno(), libc::ETIMEDOUT);
}

fn manifest_cfg(dir: &std::path::Path, data: &[u8]) -> ImageConfig {
    let mut cfg = config(dir);
    cfg.manifest = Some(Manifest::build(data, 4096, |_| {}).unwrap());
    cfg
}

#[tokio::test]
async fn corrupt_chunk_is_refetched_once() {
    let data = pattern(SIZE, 9);
    let src = Arc::new(FakeSource::new(data.clone()));
    src.inject(Fault::CorruptAt { offset: 40_000, times: 1 });
    let dir = tempfile::tempdir().unwrap();
    let img = LazyImage::open(src.clone(), manifest_cfg(dir.path(), &data)).await.unwrap();
    let got = img.read(40_000, 100).await.unwrap();
    assert_eq!(&got[..], &data[40_000..40_100]);
    assert_eq!(img.stats().verify_failures, 1);
    assert!(!img.condition().abnormal);
}

#[tokio::test]
async fn persistently_corrupt_chunk_is_eio_never_bytes() {
    let data = pattern(SIZE, 10);
    let src = Arc::new(FakeSource::new(data.clone()));
    src.inject(Fault::CorruptAt { offset: 40_000, times: 2 });
    let dir = tempfile::tempdir().unwrap();
    let img = LazyImage::open(src.clone(), manifest_cfg(dir.path(), &data)).await.unwrap();
    let e = img.read(40_000, 100).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity);
    assert_eq!(e.kind().errno(), 5);
    let cond = img.condition();
    assert!(cond.abnormal && cond.message.contains("manifest"), "{cond:?}");
    // Not cached: with the origin healthy again the chunk is fetched and served correctly.
    let got = img.read(40_000, 100).await.unwrap();
    assert_eq!(&got[..], &data[40_000..40_100]);
}

#[tokio::test]
async fn manifest_for_another_size_is_refused() {
    let data = pattern(SIZE, 11);
    let dir = tempfile::tempdir().unwrap();
    let cfg = manifest_cfg(dir.path(), &data[..SIZE - 4096]);
    let e = LazyImage::open(Arc::new(FakeSource::new(data)), cfg).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Integrity);
}

#[tokio::test]
async fn changed_origin_is_never_mixed() {
    let old = pattern(SIZE, 12);
    let new = pattern(SIZE, 13);
    let src = Arc::new(FakeSource::new(old.clone()));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    img.read(0, 8192).await.unwrap();
    src.replace(new.clone(), "\"v2\"");
    let e = img.read(500_000, 10).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OriginChanged);
    assert!(img.condition().abnormal);
    // Already cached bytes belong to the attached version and are still served.
    assert_eq!(&img.read(0, 10).await.unwrap()[..], &old[..10]);
    img.close().await.unwrap();
    // A new attach sees the new version and does not reuse the old cache.
    let img = open(src.clone(), dir.path()).await;
    assert_eq!(img.fill().0, 0);
    assert_eq!(&img.read(0, 8192).await.unwrap()[..], &new[..8192]);
}

#[tokio::test]
async fn warm_cache_is_reused_after_reopen() {
    let data = pattern(SIZE, 14);
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    img.prefetch_all(4, |_, _| {}).await.unwrap();
    img.close().await.unwrap();
    let fetched = src.fetch_count();
    let img = open(src.clone(), dir.path()).await;
    assert_eq!(img.fill().0, img.fill().1);
    assert_eq!(&img.read(0, SIZE as u64).await.unwrap()[..], &data[..]);
    assert_eq!(src.fetch_count(), fetched, "warm reads fetch nothing");
}

#[tokio::test]
async fn complete_data_file_is_the_image_and_survives_a_reset() {
    let data = pattern(SIZE + 1000, 17);
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    img.read(0, 4096).await.unwrap();
    assert_eq!(img.complete_data_file(), None, "partly cached");
    img.prefetch_all(4, |_, _| {}).await.unwrap();
    let path = img.complete_data_file().expect("fully cached");
    assert_eq!(std::fs::read(&path).unwrap(), data);
    // A loop device holds the file open; the origin changes and the cache is reset under it.
    let held = std::fs::File::open(&path).unwrap();
    img.close().await.unwrap();
    let new = pattern(SIZE + 1000, 18);
    src.replace(new.clone(), "\"v2\"");
    let img = open(src.clone(), dir.path()).await;
    assert_eq!(img.fill().0, 0);
    assert_eq!(&img.read(0, 8192).await.unwrap()[..], &new[..8192]);
    img.close().await.unwrap();
    let mut old = Vec::new();
    std::io::Read::read_to_end(&mut &held, &mut old).unwrap();
    assert_eq!(old, data, "the reset made a new file instead of rewriting the held one");
}

/// Flushes that overlap (the periodic one, `flush`, `close`) all succeed: they once raced on the
/// stats file's temporary name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_flushes_all_succeed() {
    let src = Arc::new(FakeSource::new(pattern(SIZE, 24)));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src, dir.path()).await;
    for round in 0..30u64 {
        img.read(round * 16384, 100).await.unwrap();
        let flushes: Vec<_> = (0..8)
            .map(|_| {
                let img = img.clone();
                tokio::spawn(async move { img.flush().await })
            })
            .collect();
        for f in flushes {
            f.await.unwrap().unwrap_or_else(|e| panic!("round {round}: {}", e.report()));
        }
    }
    img.close().await.unwrap();
}

/// Fetched bytes waiting for their cache write are bounded: with room for one request, a
/// prefetch asking for 8 at a time fetches one, writes it, then fetches the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_wait_for_room_behind_cache_writes() {
    let data = pattern(SIZE, 23);
    for (room, most) in [(64 << 10, 1), (1 << 30, 8)] {
        let src = Arc::new(FakeSource::new(data.clone()));
        // Long enough that, given room, all 8 start before the first ends on a busy machine.
        src.inject(Fault::Delay(std::time::Duration::from_millis(20)));
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path());
        cfg.write_behind = room;
        let img = LazyImage::open(src.clone(), cfg).await.unwrap();
        img.prefetch_all(8, |_, _| {}).await.unwrap();
        assert_eq!(src.most_at_once(), most, "fetches at once with {room} bytes of room");
        assert_eq!(&img.read(0, SIZE as u64).await.unwrap()[..], &data[..]);
        img.close().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_fill_completes_the_image_beside_readers() {
    let data = pattern(SIZE + 5000, 19);
    let src = Arc::new(FakeSource::new(data.clone()));
    src.inject(Fault::Delay(std::time::Duration::from_millis(2)));
    let dir = tempfile::tempdir().unwrap();
    let img = open(src.clone(), dir.path()).await;
    let filler = {
        let img = img.clone();
        tokio::spawn(async move { img.fill_in_background().await })
    };
    // Readers meanwhile get exactly the image's bytes, wherever the fill is.
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    for _ in 0..200 {
        let o = rng.gen_range(0..data.len() as u64 - 9000);
        assert_eq!(&img.read(o, 9000).await.unwrap()[..], &data[o as usize..o as usize + 9000]);
    }
    filler.await.unwrap().unwrap();
    assert!(img.complete_data_file().is_some());
    assert_eq!(src.bytes_count(), data.len() as u64, "every byte fetched once, none twice");
    assert_eq!(&img.read(0, data.len() as u64).await.unwrap()[..], &data[..]);

    // With a cache limit below the image it stops with a clear error instead of refetching forever.
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg = config(dir2.path());
    cfg.cache_limit = Some(SIZE as u64 / 2);
    let img = LazyImage::open(Arc::new(FakeSource::new(data.clone())), cfg).await.unwrap();
    let e = img.fill_in_background().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::CacheIo);
    assert!(e.to_string().contains("cache limit"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_stopped_by_an_outage_resumes_and_one_stopped_by_a_changed_origin_does_not() {
    use lazy_image_engine::FillResume;
    let data = pattern(SIZE, 23);
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.retry.deadline = std::time::Duration::from_millis(300);
    let img = LazyImage::open(src.clone(), cfg).await.unwrap();
    // An outage at one place outlasts several fills' retries.
    src.inject(Fault::FailAt { offset: SIZE as u64 / 2, times: 40, kind: ErrorKind::OriginStatus(503) });
    let resume = FillResume { first_pause: std::time::Duration::from_millis(20), max_pause: std::time::Duration::from_millis(80) };
    let mut pauses = Vec::new();
    img.fill_until_complete(&resume, |e, d| pauses.push((e.kind(), d))).await.unwrap();
    assert!(pauses.len() >= 2, "the outage stopped more than one fill: {pauses:?}");
    assert!(pauses.iter().all(|(k, _)| *k == ErrorKind::DeadlineExceeded), "{pauses:?}");
    assert!(pauses.iter().all(|(_, d)| *d <= resume.max_pause));
    assert!(img.complete_data_file().is_some());
    assert_eq!(src.bytes_count(), data.len() as u64, "every byte fetched once");
    assert_eq!(&img.read(0, data.len() as u64).await.unwrap()[..], &data[..]);

    // A new version at the origin is no outage: the fill ends at once with that error.
    let dir2 = tempfile::tempdir().unwrap();
    let src2 = Arc::new(FakeSource::new(data.clone()));
    let img = open(src2.clone(), dir2.path()).await;
    src2.replace(pattern(SIZE, 24), "\"v2\"");
    let mut paused = 0;
    let e = img.fill_until_complete(&resume, |_, _| paused += 1).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OriginChanged);
    assert_eq!(paused, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answered_before_their_cache_writes_still_land_by_close() {
    // Readers get a run's bytes before its cache write; re-reads in between must not refetch,
    // and `close` must wait for the writes, or a re-attach would fetch again.
    let data = pattern(SIZE, 15);
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.readahead_max = 0;
    let img = LazyImage::open(src.clone(), cfg.clone()).await.unwrap();
    let offsets: Vec<u64> = (0..40).map(|i| (i * 26_111) % (SIZE as u64 - 5000)).collect();
    for &o in &offsets {
        assert_eq!(&img.read(o, 5000).await.unwrap()[..], &data[o as usize..o as usize + 5000]);
        assert_eq!(&img.read(o, 5000).await.unwrap()[..], &data[o as usize..o as usize + 5000]);
    }
    let fetched = src.fetch_count();
    let have = img.fill().0;
    img.close().await.unwrap();
    let img = LazyImage::open(src.clone(), cfg).await.unwrap();
    assert!(img.fill().0 >= have && img.fill().0 > 0);
    for &o in &offsets {
        assert_eq!(&img.read(o, 5000).await.unwrap()[..], &data[o as usize..o as usize + 5000]);
    }
    assert_eq!(src.fetch_count(), fetched, "every chunk read before close is cached after it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_whose_reader_gives_up_is_still_fetched_and_cached() {
    // A lone miss is driven by its reader; a reader that goes away mid-fetch must hand the run
    // on, or its chunk would stay claimed and unfetched.
    let data = pattern(SIZE, 21);
    let src = Arc::new(FakeSource::new(data.clone()));
    src.inject(Fault::Delay(std::time::Duration::from_millis(100)));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.readahead_max = 0;
    let img = LazyImage::open(src.clone(), cfg).await.unwrap();
    let before = (src.fetch_count(), img.fill().0);
    let gave_up = tokio::time::timeout(std::time::Duration::from_millis(20), img.read(300_000, 100)).await;
    assert!(gave_up.is_err(), "the read should still be waiting on the origin");
    let t = std::time::Instant::now();
    while img.fill().0 == before.1 {
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "the abandoned run never finished");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(&img.read(300_000, 100).await.unwrap()[..], &data[300_000..300_100]);
    assert_eq!(src.fetch_count() - before.0, 1, "fetched once, by the run the first reader left");
}

#[tokio::test]
async fn second_opener_of_a_cache_is_refused() {
    let src = Arc::new(FakeSource::new(pattern(SIZE, 15)));
    let dir = tempfile::tempdir().unwrap();
    let _a = open(src.clone(), dir.path()).await;
    let e = LazyImage::open(src, config(dir.path())).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::CacheBusy);
}

#[tokio::test]
async fn cache_limit_evicts_unused_images_and_caps_growth() {
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(FakeSource::new(pattern(SIZE, 16)));
    let img = open(a.clone(), dir.path()).await;
    img.prefetch_all(4, |_, _| {}).await.unwrap();
    let a_dir = img.cache_dir();
    img.close().await.unwrap();

    // A second image with a limit that cannot hold both evicts the first (not in use) ...
    let bdata = pattern(SIZE, 17);
    let b = Arc::new(FakeSource::new(bdata.clone()));
    b.replace(bdata.clone(), "\"other\"");
    let mut cfg = config(dir.path());
    cfg.cache_limit = Some(SIZE as u64 + SIZE as u64 / 2);
    // Different content under the same fake URL would share a key; give b its own cache root key.
    cfg.manifest = Some(Manifest::build(&bdata[..], 4096, |_| {}).unwrap());
    let img = LazyImage::open(b.clone(), cfg).await.unwrap();
    assert!(!a_dir.exists(), "unused image evicted");
    img.prefetch_all(4, |_, _| {}).await.unwrap();
    assert_eq!(&img.read(0, SIZE as u64).await.unwrap()[..], &bdata[..]);

    // ... and an image bigger than the limit is served in full but cached only up to it.
    let c = pattern(2 * SIZE, 18);
    let src = Arc::new(FakeSource::new(c.clone()));
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg = config(dir2.path());
    cfg.cache_limit = Some(SIZE as u64 / 2);
    let img = LazyImage::open(src, cfg).await.unwrap();
    assert_eq!(&img.read(0, 2 * SIZE as u64).await.unwrap()[..], &c[..]);
    let (have, total) = img.fill();
    assert!(have * 4096 <= SIZE as u64 / 2 && have < total, "{have}/{total}");
}

#[tokio::test]
async fn eviction_passes_pinned_caches_by() {
    // Two unused caches, one pinned (a warm order): a third image that needs the room of both
    // gets only the unpinned one's; once unpinned, the other goes too.
    let dir = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    for seed in [40, 41] {
        let data = pattern(SIZE, seed);
        let mut cfg = config(dir.path());
        cfg.manifest = Some(Manifest::build(&data[..], 4096, |_| {}).unwrap());
        let img = LazyImage::open(Arc::new(FakeSource::new(data)), cfg).await.unwrap();
        img.prefetch_all(4, |_, _| {}).await.unwrap();
        dirs.push(img.cache_dir());
        img.close().await.unwrap();
    }
    lazy_image_engine::cache::pin(&dirs[0]).unwrap();
    let listed = lazy_image_engine::cache::list_images(dir.path()).unwrap();
    assert_eq!(listed.iter().filter(|i| i.pinned).count(), 1);
    let data = pattern(SIZE, 42);
    let mut cfg = config(dir.path());
    cfg.cache_limit = Some(SIZE as u64 + SIZE as u64 / 2);
    cfg.manifest = Some(Manifest::build(&data[..], 4096, |_| {}).unwrap());
    let img = LazyImage::open(Arc::new(FakeSource::new(data.clone())), cfg.clone()).await.unwrap();
    assert!(dirs[0].exists(), "the pinned cache was evicted");
    assert!(!dirs[1].exists(), "the unpinned, unused cache was kept");
    img.close().await.unwrap();
    lazy_image_engine::cache::unpin(&dirs[0]).unwrap();
    lazy_image_engine::cache::unpin(&dirs[0]).unwrap(); // twice is fine
    let img = LazyImage::open(Arc::new(FakeSource::new(data)), cfg).await.unwrap();
    assert!(!dirs[0].exists(), "an unpinned cache is evicted like any other");
    img.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_cache_disk_serves_right_bytes_and_says_so() {
    // The cache disk fills up mid-read: reads still return the image's bytes (from memory; the
    // chunks stay missing), the image says why it stopped caching, nothing cached is lost, and
    // caching resumes once there is room.
    let Some(disk) = common::SmallDisk::mount(256 << 10) else { return };
    let data = pattern(2 * SIZE, 25);
    let src = Arc::new(FakeSource::new(data.clone()));
    let cfg = config(disk.path());
    let img = LazyImage::open(src.clone(), cfg.clone()).await.unwrap();
    let piece = 64 << 10;
    for off in (0..data.len()).step_by(piece) {
        assert_eq!(&img.read(off as u64, piece as u64).await.unwrap()[..], &data[off..off + piece], "read at {off}");
    }
    let t = std::time::Instant::now();
    while !img.condition().abnormal {
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "a full cache disk left the image healthy");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let why = img.condition().message;
    assert!(why.contains("No space left"), "{why}");
    assert!(img.stats().cache_write_errors > 0);
    let (have, total) = img.fill();
    assert!(have > 0 && have < total, "{have}/{total}");
    img.flush().await.expect("a full disk still persists which chunks are cached");
    img.close().await.expect("close on a full disk");

    // Another image cannot start a cache there: a clear error, and the first cache is left alone.
    let other = pattern(SIZE, 26);
    let mut other_cfg = cfg.clone();
    other_cfg.manifest = Some(Manifest::build(&other[..], 4096, |_| {}).unwrap());
    let e = LazyImage::open(Arc::new(FakeSource::new(other)), other_cfg).await.err().unwrap();
    assert_eq!(e.kind(), ErrorKind::CacheIo);
    assert!(e.report().contains("No space left"), "{}", e.report());

    // Reopened on the same full disk: what was cached is reused and right, the rest refetched.
    let img = LazyImage::open(src.clone(), cfg.clone()).await.unwrap();
    assert_eq!(img.fill().0, have, "every chunk cached before close is known after it");
    let before = src.bytes_count();
    assert_eq!(&img.read(0, data.len() as u64).await.unwrap()[..], &data[..]);
    assert_eq!(src.bytes_count() - before, (total - have) * 4096, "cached chunks are not fetched again");

    // With room again, misses are cached and the image is healthy once more.
    disk.resize(8 << 20);
    let t = std::time::Instant::now();
    while img.condition().abnormal || img.fill().0 < total {
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "caching did not resume: {:?} {:?}", img.condition().message, img.fill());
        img.read(0, data.len() as u64).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    img.close().await.unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Any mix of concurrent reads returns exactly the source's bytes, cold or warm, whether
    /// they come back as a new buffer (`read`) or are written into the caller's (`read_into`,
    /// which must leave the bytes past the image's end untouched), and whether fetched bytes
    /// arrive at once or in pieces that readers of other runs take as they come.
    #[test]
    fn random_concurrent_reads_equal_source(
        reads in prop::collection::vec((0u64..(SIZE as u64 + 5000), 1u64..70_000, any::<bool>()), 1..40),
        chunk_shift in 12u32..15,
        trickle in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(3).enable_all().build().unwrap();
        rt.block_on(async move {
            let data = Arc::new(pattern(SIZE + 1234, chunk_shift as u64));
            let src = Arc::new(FakeSource::new(data.to_vec()));
            if trickle {
                src.inject(Fault::Trickle { piece: 3000, pause: std::time::Duration::from_micros(300) });
            }
            let dir = tempfile::tempdir().unwrap();
            let mut cfg = config(dir.path());
            cfg.chunk_size = 1 << chunk_shift;
            let img = LazyImage::open(src, cfg).await.unwrap();
            let tasks: Vec<_> = reads.into_iter().map(|(off, len, into)| {
                let (img, data) = (img.clone(), data.clone());
                tokio::spawn(async move {
                    let n = data.len() as u64;
                    let (a, b) = (off.min(n) as usize, (off + len).min(n) as usize);
                    if into {
                        let mut buf = vec![0xA5u8; len as usize];
                        let got = img.read_into(off, &mut buf).await.unwrap();
                        assert_eq!(got, b - a, "read_into {off}+{len}: length");
                        assert_eq!(&buf[..got], &data[a..b], "read_into {off}+{len}");
                        assert!(buf[got..].iter().all(|&x| x == 0xA5), "read_into {off}+{len} wrote past the image");
                    } else {
                        let got = img.read(off, len).await.unwrap();
                        assert_eq!(&got[..], &data[a..b], "read {off}+{len}");
                    }
                })
            }).collect();
            for t in tasks { t.await.unwrap(); }
        });
    }
}
