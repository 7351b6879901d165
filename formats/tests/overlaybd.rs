//! OverlayBD layers written by our converter and read back as devices: every byte of a
//! converted ext4, erofs and squashfs image (plain, lz4 and zstd ZFile), and of a base + diff
//! stack, equals the image it came from. Broken and hostile layers fail with an error, never a
//! panic.

mod common;

use common::{assert_view_is, hex, Files, Mem};
use lazy_image_engine::{ErrorKind, View};
use lazy_image_formats::open_view;
use lazy_image_formats::overlaybd::{lsmt, zfile};
use proptest::prelude::*;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Command;

fn tools_present() -> bool {
    common::tools_present(&["mkfs.ext4", "debugfs", "mkfs.erofs", "mksquashfs"], "e2fsprogs, erofs-utils, squashfs-tools")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A directory of files: random ones, compressible ones, an empty one, a nested directory.
fn tree(dir: &Path, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    std::fs::create_dir_all(dir.join("sub/deeper")).unwrap();
    for i in 0..6 {
        let mut data = vec![0u8; rng.gen_range(1..300_000)];
        match i % 3 {
            0 => rng.fill_bytes(&mut data),
            1 => data.iter_mut().enumerate().for_each(|(j, b)| *b = (j % 97) as u8),
            _ => {
                let half = data.len() / 2;
                rng.fill_bytes(&mut data[..half])
            }
        }
        let at = if i % 2 == 0 { dir.join(format!("f{i}")) } else { dir.join(format!("sub/deeper/g{i}")) };
        std::fs::write(at, data).unwrap();
    }
    std::fs::write(dir.join("empty"), b"").unwrap();
}

/// The second version of a tree: one file rewritten, one removed, one added.
fn change(dir: &Path) {
    std::fs::write(dir.join("f0"), vec![0x5au8; 123_457]).unwrap();
    std::fs::remove_file(dir.join("sub/deeper/g1")).unwrap();
    let mut extra = vec![0u8; 200_000];
    rand::rngs::StdRng::seed_from_u64(9).fill_bytes(&mut extra);
    std::fs::write(dir.join("sub/new"), extra).unwrap();
}

fn make_fs(kind: &str, src: &Path, out: &Path) {
    match kind {
        "ext4" => run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-U", "clear", "-d"])
            .arg(src)
            .arg(out)
            .arg("8M")),
        "erofs" => run(Command::new("mkfs.erofs").args(["-T", "0"]).arg(out).arg(src)),
        "squashfs" => run(Command::new("mksquashfs").arg(src).arg(out).args(["-noappend", "-quiet", "-mkfs-time", "0", "-all-time", "0"])),
        _ => unreachable!(),
    }
}

/// Converts `image` (on `base`) into a layer at `out`, compressed as asked.
fn convert(image: &Path, base: Option<&Path>, out: &Path, z: Option<(zfile::Algo, u32)>) -> u64 {
    let mut img = BufReader::new(File::open(image).unwrap());
    let mut b = base.map(|p| BufReader::new(File::open(p).unwrap()));
    let plain = out.with_extension("lsmt-part");
    let mut f = File::create(&plain).unwrap();
    lsmt::write_layer(&mut img, b.as_mut().map(|r| r as &mut dyn std::io::Read), &mut f).unwrap();
    drop(f);
    match z {
        None => std::fs::rename(&plain, out).unwrap(),
        Some((algo, block_size)) => {
            let mut o = File::create(out).unwrap();
            zfile::write(&mut BufReader::new(File::open(&plain).unwrap()), &mut o, zfile::WriteOptions { algo, block_size, verify: true })
                .unwrap();
            std::fs::remove_file(&plain).unwrap();
        }
    }
    std::fs::metadata(out).unwrap().len()
}

async fn stack(layers: &[&Path], cache: &Path) -> lazy_image_engine::Result<View> {
    let files = Files::new(cache);
    let names: Vec<String> = layers.iter().map(|p| p.to_str().unwrap().to_string()).collect();
    let (top, lowers) = names.split_last().unwrap();
    open_view(top, lowers, &files).await.map(|(_, v)| v)
}

#[tokio::test]
async fn converted_filesystems_read_back_byte_for_byte() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (n, kind) in ["ext4", "erofs", "squashfs"].into_iter().enumerate() {
        let (src, a, b) = (d.join(format!("{kind}-src")), d.join(format!("{kind}-a.img")), d.join(format!("{kind}-b.img")));
        tree(&src, n as u64);
        make_fs(kind, &src, &a);
        change(&src);
        if kind == "ext4" {
            // A changed copy of the same filesystem, as a writer would leave it.
            std::fs::copy(&a, &b).unwrap();
            let cmds = format!(
                "rm /f0\nwrite {} /f0\nrm /sub/deeper/g1\nwrite {} /sub/new\n",
                src.join("f0").display(),
                src.join("sub/new").display()
            );
            std::fs::write(d.join("debugfs.cmds"), cmds).unwrap();
            run(Command::new("debugfs").arg("-w").arg("-f").arg(d.join("debugfs.cmds")).arg(&b));
        } else {
            make_fs(kind, &src, &b);
        }
        let (want_a, want_b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let cache = |name: &str| d.join(format!("cache-{kind}-{name}"));
        let layer = |name: &str| d.join(format!("{kind}-{name}"));

        let singles = [("a.lsmt", None), ("a.lz4", Some((zfile::Algo::Lz4, 4096))), ("a.zstd", Some((zfile::Algo::Zstd, 32768)))];
        for (name, z) in singles {
            convert(&a, None, &layer(name), z);
            let v = stack(&[&layer(name)], &cache(name)).await.unwrap();
            assert_view_is(&v, &want_a, &format!("{kind} {name}")).await;
        }
        let full_b = convert(&b, None, &layer("b.lsmt"), None);
        let diff = convert(&b, Some(&a), &layer("b-on-a.lsmt"), None);
        // Rebuilt erofs and squashfs images move everything; an ext4 changed in place does not.
        assert!(
            kind != "ext4" || diff < full_b / 2,
            "{kind}: the diff layer ({diff} bytes) holds more than the changes (full layer {full_b} bytes)"
        );
        convert(&b, Some(&a), &layer("b-on-a.zstd"), Some((zfile::Algo::Zstd, 16384)));
        for (lower, upper) in [("a.lsmt", "b-on-a.lsmt"), ("a.lz4", "b-on-a.zstd")] {
            let v = stack(&[&layer(lower), &layer(upper)], &cache(&format!("{lower}+{upper}"))).await.unwrap();
            assert_view_is(&v, &want_b, &format!("{kind} {lower} + {upper}")).await;
        }
    }
}

/// A 1 MiB disk: random data, zeros, a pattern; and a second version with some blocks
/// rewritten, some zeroed, and 64 KiB more at the end.
fn disks(seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut a = vec![0u8; 1 << 20];
    for (i, c) in a.chunks_mut(64 << 10).enumerate() {
        match i % 3 {
            0 => rng.fill_bytes(c),
            1 => {}
            _ => c.iter_mut().enumerate().for_each(|(j, b)| *b = (j % 251) as u8),
        }
    }
    let mut b = a.clone();
    b[5000..9000].fill(0xee);
    b[(6 << 16)..(6 << 16) + 8192].fill(0);
    b[(9 << 16) + 100..(9 << 16) + 300].fill(0);
    b.extend((0..65536u32).map(|i| (i * 7) as u8));
    (a, b)
}

#[tokio::test]
async fn stacks_read_their_topmost_layer_and_check_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = disks(1);
    let (pa, pb) = (d.join("a.raw"), d.join("b.raw"));
    std::fs::write(&pa, &a).unwrap();
    std::fs::write(&pb, &b).unwrap();
    convert(&pa, None, &d.join("a.lsmt"), None);
    convert(&pb, Some(&pa), &d.join("b.lz4"), Some((zfile::Algo::Lz4, 8192)));
    let v = stack(&[&d.join("a.lsmt"), &d.join("b.lz4")], &d.join("c1")).await.unwrap();
    assert_view_is(&v, &b, "a + b").await;

    // Layers given in the wrong order name the wrong parent.
    let e = stack(&[&d.join("b.lz4"), &d.join("a.lsmt")], &d.join("c2")).await.map(|_| ()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("layers out of order"), "{e}");
    // A flat image takes no lower layers.
    let e = stack(&[&d.join("a.lsmt"), &pa], &d.join("c3")).await.map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("only an OverlayBD layer stacks"), "{e}");

    // The writer never makes blocks the reference reader cannot hold.
    let mut sink = std::io::Cursor::new(Vec::new());
    let e =
        zfile::write(&mut &a[..], &mut sink, zfile::WriteOptions { algo: zfile::Algo::Lz4, block_size: 65536, verify: true }).unwrap_err();
    assert!(e.to_string().contains("64 KiB"), "{e}");
}

/// Opens `bytes` as a lone layer (from memory).
async fn open_layer(bytes: Vec<u8>, cache: &Path) -> lazy_image_engine::Result<View> {
    let mem = Mem(HashMap::from([("/l/top".to_string(), bytes)]), cache.to_path_buf());
    open_view("/l/top", &[], &mem).await.map(|(_, v)| v)
}

#[tokio::test]
async fn broken_layers_are_refused_precisely() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, _) = disks(2);
    let pa = d.join("a.raw");
    std::fs::write(&pa, &a).unwrap();
    convert(&pa, None, &d.join("a.lsmt"), None);
    convert(&pa, None, &d.join("a.zstd"), Some((zfile::Algo::Zstd, 4096)));
    let plain = std::fs::read(d.join("a.lsmt")).unwrap();
    let zstd = std::fs::read(d.join("a.zstd")).unwrap();
    let trailer = plain.len() - 4096;
    let index_at = u64::from_le_bytes(plain[trailer + 32..trailer + 40].try_into().unwrap()) as usize;

    let mut cases: Vec<(&str, Vec<u8>, ErrorKind, &str)> = Vec::new();
    let mut unsealed = plain.clone();
    unsealed[trailer + 28] &= !4;
    cases.push(("unsealed", unsealed, ErrorKind::InvalidInput, "commit the layer first"));
    let mut swapped = plain.clone();
    let (r0, r1) = (swapped[index_at..index_at + 16].to_vec(), swapped[index_at + 16..index_at + 32].to_vec());
    swapped[index_at..index_at + 16].copy_from_slice(&r1);
    swapped[index_at + 16..index_at + 32].copy_from_slice(&r0);
    cases.push(("index out of order", swapped, ErrorKind::Integrity, "out of order"));
    let mut outside = plain.clone();
    outside[index_at + 8..index_at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cases.push(("data outside", outside, ErrorKind::Integrity, "outside the layer's data"));
    let mut huge = plain.clone();
    huge[trailer + 40..trailer + 48].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    cases.push(("index too large", huge, ErrorKind::InvalidInput, "records is more than"));
    let zt = zstd.len() - 512;
    let mut digest = zstd.clone();
    digest[zt + 60] ^= 1;
    cases.push(("trailer digest", digest, ErrorKind::Integrity, "digest"));
    let mut table = zstd.clone();
    let zindex = u64::from_le_bytes(zstd[zt + 40..zt + 48].try_into().unwrap()) as usize;
    table[zindex] ^= 1;
    cases.push(("block table", table, ErrorKind::Integrity, "table checksum"));
    let mut dict = zstd.clone();
    dict[zt + 78] = 1;
    dict[zt + 28..zt + 32].fill(0);
    let digest = zfile::raw_crc32c(0, &dict[zt..]);
    dict[zt + 28..zt + 32].copy_from_slice(&digest.to_le_bytes());
    cases.push(("dictionary", dict, ErrorKind::InvalidInput, "dictionaries"));
    for (name, bytes, kind, says) in cases {
        let e = open_layer(bytes, &d.join(format!("c-{name}"))).await.map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), kind, "{name}: {e}");
        assert!(e.to_string().contains(says), "{name}: {e}");
    }
    // A damaged block fails the read that needs it, with its checksum.
    // Block 10 holds data (block 0 the layer's header, the last ones its index and trailer).
    let lens: Vec<usize> = zstd[zindex..zindex + 40].chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize).collect();
    let mut block = zstd.clone();
    block[512 + lens.iter().sum::<usize>() + 2] ^= 0x40;
    let v = open_layer(block, &d.join("c-block")).await.unwrap();
    // Blocks are checked once, when first decoded: a damaged one is never taken as checked, so
    // every read of it fails.
    for _ in 0..2 {
        let e = v.read(0, v.size()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");
        assert!(e.to_string().contains("checksum"), "{e}");
    }
}

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/overlaybd");

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(CORPUS)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x != "md" && x != "sha256"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

/// The stacks the corpus's sums name: `lower+upper`, bottom first.
fn corpus_stack(name: &str) -> Vec<String> {
    name.split('+').map(|n| format!("/c/{n}")).collect()
}

/// The corpus in the tree reads as it did when it was written.
#[tokio::test]
async fn corpus_layers_read_as_recorded() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let sums = std::fs::read_to_string(format!("{CORPUS}/device-views.sha256")).unwrap();
    assert!(sums.lines().count() >= 3);
    for line in sums.lines() {
        let (want, name) = line.split_once("  ").unwrap();
        let mem = Mem(corpus().into_iter().map(|(n, d)| (format!("/c/{n}"), d)).collect(), dir.path().join(name));
        let names = corpus_stack(name);
        let (top, lowers) = names.split_last().unwrap();
        let (_blob, view) = open_view(top, lowers, &mem).await.unwrap();
        let bytes = view.read(0, view.size()).await.unwrap();
        assert_eq!(hex(&Sha256::digest(&bytes)), want, "{name}");
    }
}

/// Writes the corpus (run by hand after a format change: `LAZY_IMAGE_WRITE_CORPUS=1`).
#[test]
fn write_corpus() {
    if std::env::var_os("LAZY_IMAGE_WRITE_CORPUS").is_none() {
        return;
    }
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = disks(7);
    let (a, b) = (a[..256 << 10].to_vec(), b[..320 << 10].to_vec());
    let (pa, pb) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&pa, &a).unwrap();
    std::fs::write(&pb, &b).unwrap();
    let c = PathBuf::from(CORPUS);
    std::fs::create_dir_all(&c).unwrap();
    convert(&pa, None, &c.join("base.lsmt"), None);
    convert(&pa, None, &c.join("base-lz4.zfile"), Some((zfile::Algo::Lz4, 4096)));
    convert(&pb, Some(&pa), &c.join("diff-zstd.zfile"), Some((zfile::Algo::Zstd, 8192)));
    let sums = [("base.lsmt", &a), ("base-lz4.zfile", &a), ("base.lsmt+diff-zstd.zfile", &b), ("base-lz4.zfile+diff-zstd.zfile", &b)]
        .iter()
        .map(|(n, d)| format!("{}  {n}\n", hex(&Sha256::digest(d))))
        .collect::<String>();
    std::fs::write(c.join("device-views.sha256"), sums).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]
    /// Corpus stacks with bytes changed in their headers, indexes, tables, trailers or data:
    /// opening and reading every byte ends in bytes or an error, never a panic.
    #[test]
    fn mutated_layers_never_panic(which in 0usize..4, flips in proptest::collection::vec((any::<bool>(), 0usize..8192, any::<u8>()), 1..12)) {
        let layers = corpus();
        let sums = std::fs::read_to_string(format!("{CORPUS}/device-views.sha256")).unwrap();
        let names: Vec<&str> = sums.lines().filter_map(|l| l.split_once("  ").map(|(_, n)| n)).collect();
        let name = names[which % names.len()];
        let stack = corpus_stack(name);
        let victim = stack[flips.len() % stack.len()].trim_start_matches("/c/").to_string();
        let mut set: HashMap<String, Vec<u8>> = layers.into_iter().map(|(n, d)| (format!("/c/{n}"), d)).collect();
        let b = set.get_mut(&format!("/c/{victim}")).unwrap();
        for (from_end, at, x) in &flips {
            let i = if *from_end { b.len() - 1 - at % b.len() } else { at % b.len() };
            b[i] ^= x | 1;
        }
        let dir = tempfile::tempdir().unwrap();
        let mem = Mem(set, dir.path().to_path_buf());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (top, lowers) = stack.split_last().unwrap();
            if let Ok((_, view)) = open_view(top, lowers, &mem).await {
                let size = view.size().min(4 << 20);
                let mut buf = vec![0u8; 20 << 10];
                let mut at = 0;
                while at < size {
                    if view.read_into(at, &mut buf).await.is_err() {
                        break;
                    }
                    at += buf.len() as u64;
                }
            }
        });
    }
}
