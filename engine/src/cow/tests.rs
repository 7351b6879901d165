use super::*;
use crate::source::FakeSource;
use crate::{ImageConfig, LazyImage};

const SIZE: usize = 256 << 10;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(31).wrapping_add(seed as u32) as u8 | 1).collect()
}

async fn below(dir: &Path, data: &[u8]) -> (LazyImage, Arc<FakeSource>) {
    let src = Arc::new(FakeSource::new(data.to_vec()));
    let mut cfg = ImageConfig::new(dir);
    cfg.chunk_size = 4096;
    cfg.startup_misses = 0;
    (LazyImage::open(src.clone(), cfg).await.expect("open below"), src)
}

/// Reads the whole device through every read entry point and checks each against `want`.
async fn check_all_paths(view: &CowView, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    assert_eq!(view.read_into(0, &mut got).await.expect("read_into"), want.len());
    assert!(got == want, "read_into differs");
    // Odd pieces, through plans and cached reads (everything below is cached by now).
    let mut off = 0usize;
    for step in [1usize, 4095, 4097, 512, 8192, 12288, 3].iter().cycle() {
        if off >= want.len() {
            break;
        }
        let len = (*step).min(want.len() - off);
        let mut buf = vec![0xeeu8; len];
        match view.plan_read(off as u64, &mut buf) {
            ReadPlan::Copied(n) => assert_eq!(n, len),
            ReadPlan::File { file, offset, len: flen, .. } => {
                assert_eq!(flen, len);
                let f = File::from(file.try_clone_to_owned().expect("dup"));
                f.read_exact_at(&mut buf, offset).expect("planned read");
            }
            // What below has not written to its cache file yet is a miss to it too.
            ReadPlan::Miss => match view.read_cached_into(off as u64, &mut buf).expect("cached read") {
                Some(n) => assert_eq!(n, len),
                None => assert_eq!(view.read_into(off as u64, &mut buf).await.expect("read"), len),
            },
        }
        assert!(buf == want[off..off + len], "{len} bytes at {off} differ");
        off += len;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_read_back_and_leave_the_image_below_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let orig = pattern(SIZE, 7);
    let (img, _) = below(&dir.path().join("cache"), &orig).await;
    let cow = CowView::open(img.view(), &dir.path().join("layer"), SIZE as u64).expect("open layer");
    let mut model = orig.clone();
    // Whole blocks, a block's middle, a write across three blocks with ragged ends, one byte.
    for (off, len, seed) in [(8192usize, 8192usize, 1u8), (20_000, 100, 2), (40_000, 9000, 3), (100_001, 1, 4), (0, 4096, 5)] {
        let data = pattern(len, seed);
        cow.write(off as u64, &data).await.expect("write");
        model[off..off + len].copy_from_slice(&data);
    }
    cow.write_zeroes(61_440, 3 * 4096 + 10).await.expect("zeroes");
    model[61_440..61_440 + 3 * 4096 + 10].fill(0);
    check_all_paths(&cow, &model).await;
    // The image below still reads the original bytes, and so does a second layer over it.
    let mut under = vec![0u8; SIZE];
    img.read_into(0, &mut under).await.expect("below");
    assert!(under == orig, "the image below changed");
    let other = CowView::open(img.view(), &dir.path().join("other"), SIZE as u64).expect("second layer");
    check_all_paths(&other, &orig).await;
    assert!(cow.used_bytes() > 0 && other.used_bytes() == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_reopened_after_its_process_went_has_every_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let orig = pattern(SIZE, 9);
    let (img, _) = below(&dir.path().join("cache"), &orig).await;
    let layer = dir.path().join("layer");
    let mut model = orig.clone();
    {
        let cow = CowView::open(img.view(), &layer, SIZE as u64).expect("open layer");
        for (off, len) in [(4096usize, 4096usize), (30_000, 5000), (200_000, 12_288)] {
            let data = pattern(len, off as u8);
            cow.write(off as u64, &data).await.expect("write");
            model[off..off + len].copy_from_slice(&data);
        }
        cow.write_zeroes(200_704, 4096).await.expect("zeroes");
        model[200_704..200_704 + 4096].fill(0);
        // Dropped without a flush, as a killed daemon leaves it.
    }
    let cow = CowView::open(img.view(), &layer, SIZE as u64).expect("reopen layer");
    check_all_paths(&cow, &model).await;
    assert_eq!(cow.used_bytes(), (1 + 3 + 2) * BLOCK, "blocks holding data after reopening");
    // A layer belongs to its image's size.
    let (small, _) = below(&dir.path().join("cache2"), &orig[..SIZE / 2]).await;
    let err = CowView::open(small.view(), &layer, SIZE as u64).err().expect("another image refused");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("was made for a 262144-byte image"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_layer_fails_new_blocks_with_no_space_but_not_reads_or_rewrites() {
    let dir = tempfile::tempdir().expect("tempdir");
    let orig = pattern(SIZE, 3);
    let (img, _) = below(&dir.path().join("cache"), &orig).await;
    let cow = CowView::open(img.view(), &dir.path().join("layer"), 4 * BLOCK).expect("open layer");
    cow.write(0, &pattern(4 * BLOCK as usize, 1)).await.expect("four blocks fit");
    let err = cow.write(8 * BLOCK, &[1u8; 10]).await.expect_err("a fifth block");
    assert_eq!((err.kind(), err.kind().errno()), (ErrorKind::NoSpace, libc::ENOSPC));
    let err = cow.write_now(8 * BLOCK, &[1u8; 4096]).expect("whole blocks need no wait").expect_err("nor a whole one");
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    // Rewrites of blocks the layer holds still work, and so do reads.
    cow.write(100, &[9u8; 5000]).await.expect("rewrite");
    let mut model = orig.clone();
    model[..4 * BLOCK as usize].copy_from_slice(&pattern(4 * BLOCK as usize, 1));
    model[100..5100].fill(9);
    check_all_paths(&cow, &model).await;
    // Zeroing frees room.
    cow.write_zeroes(0, BLOCK).await.expect("zeroes");
    cow.write(8 * BLOCK, &[1u8; 10]).await.expect("room again");
    assert_eq!(cow.used_bytes(), 4 * BLOCK);
}

/// What a block device's driver does with `write_place`: copies the bytes there itself.
fn driver_copy(view: &CowView, offset: u64, data: &[u8]) -> bool {
    match view.write_place(offset, data.len()) {
        Some(place) => {
            // SAFETY: `write_place` hands out `data.len()` writable bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), place.as_ptr(), data.len()) };
            view.placed(offset, data.len()).expect("placed");
            true
        }
        None => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_copied_in_place_read_back_and_outlive_the_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let orig = pattern(SIZE, 11);
    let (img, _) = below(&dir.path().join("cache"), &orig).await;
    let layer = dir.path().join("layer");
    let mut model = orig.clone();
    {
        let cow = CowView::open(img.view(), &layer, SIZE as u64).expect("open layer");
        // Only blocks the layer holds can be written in place: not one below, not one zeroed,
        // not a range reaching past one it holds, nor past the device.
        assert!(!driver_copy(&cow, 0, &[1u8; 4096]), "a block below");
        cow.write(8192, &pattern(3 * 4096, 1)).await.expect("write");
        model[8192..8192 + 3 * 4096].copy_from_slice(&pattern(3 * 4096, 1));
        cow.write_zeroes(40_960, 4096).await.expect("zeroes");
        model[40_960..45_056].fill(0);
        assert!(!driver_copy(&cow, 40_960, &[1u8; 100]), "a zeroed block");
        assert!(!driver_copy(&cow, 8192, &[1u8; 4 * 4096]), "a range past the blocks held");
        assert!(cow.write_place(SIZE as u64 - 10, 20).is_none() && cow.write_place(8192, 0).is_none());
        let used = cow.used_bytes();
        // Whole blocks, a ragged piece across two of them, one byte.
        for (off, len, seed) in [(8192usize, 8192usize, 2u8), (12_000, 5000, 3), (20_479, 1, 4)] {
            assert!(driver_copy(&cow, off as u64, &pattern(len, seed)), "{len} bytes at {off} in place");
            model[off..off + len].copy_from_slice(&pattern(len, seed));
        }
        assert_eq!(cow.used_bytes(), used, "a rewrite takes no room");
        check_all_paths(&cow, &model).await;
        // Dropped without a flush, as a killed daemon leaves it.
    }
    let cow = CowView::open(img.view(), &layer, SIZE as u64).expect("reopen layer");
    check_all_paths(&cow, &model).await;
    // A read-only view has no place for writes.
    assert!(img.view().write_place(0, 4096).is_none());
    assert_eq!(img.view().placed(0, 4096).expect_err("read-only").kind(), ErrorKind::ReadOnly);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_partial_writes_to_one_block_all_land() {
    let dir = tempfile::tempdir().expect("tempdir");
    let orig = pattern(SIZE, 5);
    let (img, _) = below(&dir.path().join("cache"), &orig).await;
    let cow = CowView::open(img.view(), &dir.path().join("layer"), SIZE as u64).expect("open layer");
    // Eight 512-byte sectors of each of 16 blocks, written at once: each write copies its block
    // from below unless another got there first, and none may undo another.
    let mut tasks = Vec::new();
    for b in 0..16u64 {
        for s in 0..8u64 {
            let cow = cow.clone();
            tasks.push(tokio::spawn(async move { cow.write(b * BLOCK + s * 512, &[(b * 8 + s) as u8 | 0x80; 512]).await }));
        }
    }
    for t in tasks {
        t.await.expect("task").expect("write");
    }
    let mut model = orig.clone();
    for b in 0..16usize {
        for s in 0..8usize {
            model[b * 4096 + s * 512..b * 4096 + (s + 1) * 512].fill((b * 8 + s) as u8 | 0x80);
        }
    }
    check_all_paths(&cow, &model).await;
}

#[tokio::test]
async fn bad_layers_and_read_only_views_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (odd, _) = below(&dir.path().join("c1"), &pattern(10_000, 1)).await;
    let err = CowView::open(odd.view(), &dir.path().join("l1"), 1 << 20).err().expect("odd size refused");
    assert!(err.to_string().contains("a multiple of 4096 bytes; this one has 10000"), "{err}");
    let (img, _) = below(&dir.path().join("c2"), &pattern(SIZE, 1)).await;
    let view = img.view();
    assert!(!view.writable());
    let err = view.write(0, &[1]).await.expect_err("read-only");
    assert_eq!(err.kind().errno(), libc::EROFS);
    let cow = CowView::open(img.view(), &dir.path().join("l2"), 1 << 20).expect("layer");
    let err = cow.write(SIZE as u64 - 1, &[1, 2]).await.expect_err("past the end");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    // A layer whose files do not match its record is refused, not read.
    drop(cow);
    std::fs::OpenOptions::new().write(true).open(dir.path().join("l2/map")).expect("map").set_len(1).expect("truncate");
    let err = CowView::open(img.view(), &dir.path().join("l2"), 1 << 20).err().expect("damaged");
    assert_eq!(err.kind(), ErrorKind::Integrity);
}

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write { off: usize, len: usize, seed: u8 },
        Zero { off: usize, len: usize },
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..SIZE, 1..20_000usize, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len: len.min(SIZE - off), seed }),
            1 => (0..SIZE, 1..20_000usize).prop_map(|(off, len)| Op::Zero { off, len: len.min(SIZE - off) }),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        /// Any sequence of writes, zeroings and reopenings reads as the same operations on a
        /// plain buffer would.
        #[test]
        fn reads_as_a_buffer_given_the_same_operations(ops in proptest::collection::vec(op(), 1..24)) {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async {
                let dir = tempfile::tempdir().expect("tempdir");
                let orig = pattern(SIZE, 11);
                let (img, _) = below(&dir.path().join("cache"), &orig).await;
                let layer = dir.path().join("layer");
                let mut cow = CowView::open(img.view(), &layer, SIZE as u64).expect("open layer");
                let mut model = orig.clone();
                for op in ops {
                    match op {
                        Op::Write { off, len, seed } => {
                            let data = pattern(len, seed);
                            cow.write(off as u64, &data).await.expect("write");
                            model[off..off + len].copy_from_slice(&data);
                        }
                        Op::Zero { off, len } => {
                            cow.write_zeroes(off as u64, len as u64).await.expect("zeroes");
                            model[off..off + len].fill(0);
                        }
                        Op::Reopen => {
                            drop(cow);
                            cow = CowView::open(img.view(), &layer, SIZE as u64).expect("reopen");
                        }
                    }
                }
                check_all_paths(&cow, &model).await;
            });
        }
    }
}
