use super::*;
use crate::source::{FakeSource, Fault};

/// 4 KiB chunks, 64 KiB requests, a window of at most 256 KiB starting at `first_window`.
fn small_config(dir: &std::path::Path, first_window: u64) -> ImageConfig {
    let mut cfg = ImageConfig::new(dir);
    cfg.chunk_size = 4096;
    cfg.max_request = 64 << 10;
    cfg.readahead_initial = first_window;
    cfg.readahead_max = 256 << 10;
    cfg.startup_misses = 0;
    cfg
}

/// At the full window, read-ahead is topped up a request at a time as the reader moves on,
/// not only once half the window is left: the requests in flight then end at different
/// times and the next ones are already claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_window_is_topped_up_a_request_at_a_time() {
    let src = Arc::new(FakeSource::new(vec![7u8; 1 << 20]));
    let dir = tempfile::tempdir().expect("tempdir");
    let img = LazyImage::open(src, small_config(dir.path(), 256 << 10)).await.expect("open");
    let mut claimed = Vec::new();
    for off in (0..112u64 << 10).step_by(16 << 10) {
        img.read(off, 16 << 10).await.expect("read");
        claimed.push(img.stats().readahead_chunks);
    }
    // The third read starts the stream's window: 48..304 KiB (64 chunks). When the reader
    // reaches 112 KiB a whole request fits again: 304..368 KiB (16 chunks).
    assert_eq!(claimed, [0, 0, 64, 64, 64, 64, 80]);
}

/// Reads as large as the kernel's own read-ahead sends open the whole window at the second
/// read (see `LARGE_READ`); small reads still need two before a first, small window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_reads_open_a_wide_window_at_once() {
    let src = Arc::new(FakeSource::new(vec![3u8; 64 << 20]));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = ImageConfig::new(dir.path());
    cfg.startup_misses = 0;
    cfg.readahead_max = 16 << 20;
    let img = LazyImage::open(src, cfg.clone()).await.expect("open");
    let chunks = |bytes: u64| bytes / cfg.chunk_size;
    img.read(0, 1 << 20).await.expect("read");
    assert_eq!(img.stats().readahead_chunks, 0, "one read is not yet a stream");
    img.read(1 << 20, 1 << 20).await.expect("read");
    assert_eq!(img.stats().readahead_chunks, chunks(16 << 20), "the whole window at the second large read");

    img.read(40 << 20, 16 << 10).await.expect("read");
    img.read((40 << 20) + (16 << 10), 16 << 10).await.expect("read");
    assert_eq!(img.stats().readahead_chunks, chunks(16 << 20), "two small reads start nothing");
    img.read((40 << 20) + (32 << 10), 16 << 10).await.expect("read");
    assert_eq!(img.stats().readahead_chunks, chunks((16 << 20) + cfg.readahead_initial), "the third, a first window");
}

/// A 1 MiB image whose fetches hand their bytes over in 16 pieces 40 ms apart, fetched in
/// one request; with `verified`, checked against a manifest.
async fn trickling_image(dir: &std::path::Path, verified: bool) -> (LazyImage, Arc<FakeSource>, Vec<u8>) {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    let src = Arc::new(FakeSource::new(data.clone()));
    let mut cfg = small_config(dir, 64 << 10);
    cfg.max_request = 1 << 20;
    cfg.readahead_max = 0;
    if verified {
        cfg.manifest = Some(Manifest::build(&data[..], 4096, |_| {}).expect("manifest"));
    }
    let img = LazyImage::open(src.clone(), cfg).await.expect("open");
    src.inject(Fault::Trickle { piece: 64 << 10, pause: Duration::from_millis(40) });
    (img, src, data)
}

fn spawn_read(img: &LazyImage, offset: u64, len: u64) -> tokio::task::JoinHandle<Result<Bytes>> {
    let img = img.clone();
    tokio::spawn(async move { img.read(offset, len).await })
}

/// A reader of the front of a run another read is fetching gets its bytes when they arrive,
/// not when the whole run has: the small read ends before the run's fetch does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_take_the_front_of_a_run_before_its_end_arrives() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (img, src, data) = trickling_image(dir.path(), false).await;
    let whole = spawn_read(&img, 0, 1 << 20);
    // The whole read claims the run; this one then finds chunk 1 in flight.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let front = img.read(4096, 8192).await.expect("front read");
    assert_eq!(&front[..], &data[4096..12288]);
    assert_eq!(img.stats().origin_requests, 0, "the small read waited for the whole run");
    let got = whole.await.expect("join").expect("whole read");
    assert!(got[..] == data[..], "whole read differs");
    assert_eq!(src.fetch_count(), 1, "one run served both reads");
}

/// The same for a verified image, chunk by checked chunk: the front comes early, and a
/// reader of a chunk that arrived corrupt gets the refetched bytes, never the bad ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_a_verified_image_take_checked_chunks_as_they_arrive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (img, src, data) = trickling_image(dir.path(), true).await;
    src.inject(Fault::CorruptAt { offset: 600_000, times: 1 });
    let whole = spawn_read(&img, 0, 1 << 20);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let bad = spawn_read(&img, 600_000, 100);
    let front = img.read(4096, 8192).await.expect("front read");
    assert_eq!(&front[..], &data[4096..12288]);
    assert_eq!(img.stats().origin_requests, 0, "the small read waited for the whole run");
    let got = bad.await.expect("join").expect("read of the corrupt chunk");
    assert_eq!(&got[..], &data[600_000..600_100], "bytes that failed their check were served");
    let got = whole.await.expect("join").expect("whole read");
    assert!(got[..] == data[..], "whole read differs");
    assert_eq!(src.fetch_count(), 2, "the run, and its refetch after the corrupt chunk");
}

/// A sequential reader mostly copies read-ahead runs before their cache write ends; runs it
/// read whole must not be kept in memory for it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_read_while_in_flight_are_not_kept() {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let src = Arc::new(FakeSource::new(data.clone()));
    src.inject(Fault::Delay(Duration::from_millis(3)));
    let dir = tempfile::tempdir().expect("tempdir");
    let img = LazyImage::open(src, small_config(dir.path(), 64 << 10)).await.expect("open");
    for off in (0..data.len()).step_by(16 << 10) {
        let got = img.read(off as u64, 16 << 10).await.expect("read");
        assert_eq!(&got[..], &data[off..off + (16 << 10)]);
    }
    img.settle().await;
    let kept: Vec<(u64, usize)> = lock(&img.inner.recent).iter().map(|r| (r.run.first, r.run.served.load(Ordering::Relaxed))).collect();
    assert!(img.stats().readahead_chunks > 0, "the reads ran ahead");
    assert!(kept.is_empty(), "runs the reader had read whole are still held (first chunk, bytes read): {kept:?}");
}

/// Chunks written since the last durable sync are marked missing when a sync fails, and
/// fetched again: their data may never reach the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_a_failed_sync_are_fetched_again() {
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let src = Arc::new(FakeSource::new(data.clone()));
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = small_config(dir.path(), 64 << 10);
    cfg.readahead_max = 0;
    cfg.flush_interval = Duration::from_secs(3600);
    let img = LazyImage::open(src.clone(), cfg.clone()).await.expect("open");
    img.read(0, 64 << 10).await.expect("read");
    img.settle().await;
    img.flush().await.expect("first flush");
    img.read(512 << 10, 64 << 10).await.expect("read");
    img.settle().await;
    assert_eq!(img.fill().0, 32);

    img.inner.store.failing_syncs.store(1, Ordering::SeqCst);
    assert!(img.flush().await.is_err());
    assert_eq!(img.fill().0, 16, "the chunks synced before stay, the others are missing again");
    let c = img.condition();
    assert!(c.abnormal && c.message.contains("fetched again"), "{}", c.message);
    let before = src.bytes_count();
    assert_eq!(&img.read(512 << 10, 64 << 10).await.expect("read")[..], &data[512 << 10..576 << 10]);
    assert_eq!(src.bytes_count() - before, 64 << 10, "fetched again");
    img.settle().await;
    assert!(!img.condition().abnormal, "a cache write that works again clears the condition");
    img.close().await.expect("close");

    let img = LazyImage::open(src, cfg).await.expect("reopen");
    assert_eq!(img.fill().0, 32);
}

/// A blob with a digest is hashed once complete: the right digest keeps it healthy; a wrong
/// one (an origin that served other bytes) drops its cache and fails every read after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_blobs_are_checked_against_their_digest() {
    use sha2::Digest;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let right = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)));
    let wrong = format!("sha256:{}", "0".repeat(64));
    for (digest, good) in [(right, true), (wrong, false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = small_config(dir.path(), 64 << 10);
        cfg.flush_interval = Duration::from_millis(20);
        cfg.blob_digest = Some(digest);
        let img = LazyImage::open(Arc::new(FakeSource::new(data.clone())), cfg).await.expect("open");
        assert_eq!(&img.read(0, data.len() as u64).await.expect("read")[..], &data[..]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while img.inner.blob_check.load(Ordering::SeqCst) < BLOB_GOOD {
            assert!(Instant::now() < deadline, "the blob was never checked");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(img.condition().abnormal, !good, "{:?}", img.condition());
        match good {
            true => assert_eq!(img.fill().0, img.fill().1),
            false => {
                assert!(img.condition().message.contains("not its digest"), "{:?}", img.condition());
                assert_eq!(img.fill().0, 0, "the bad blob's cache is dropped");
                assert_eq!(img.read(0, 10).await.expect_err("reads fail").kind(), ErrorKind::Integrity);
            }
        }
    }
}
