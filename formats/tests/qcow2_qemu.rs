//! qcow2 images made by the real tools (`qemu-img`, `qemu-io` from qemu-utils): every byte of
//! our guest view equals `qemu-img convert -O raw` of the same image. Hostile variants of real
//! images fail with an error, never a panic.

mod common;

use common::{hex, Files, Mem};
use lazy_image_engine::{ErrorKind, Result};
use lazy_image_formats::open_view;
use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

fn tools_present() -> bool {
    common::tools_present(&["qemu-img", "qemu-io"], "qemu-utils")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A raw disk of `mib` MiB: random data, runs of zeros, a repeated pattern (compressible).
fn raw_disk(path: &Path, mib: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; mib << 20];
    for (i, chunk) in v.chunks_mut(256 << 10).enumerate() {
        match i % 4 {
            0 => rng.fill_bytes(chunk),
            1 => {}
            2 => chunk.iter_mut().enumerate().for_each(|(j, b)| *b = (j % 251) as u8),
            _ => rng.fill_bytes(&mut chunk[..4096]),
        }
    }
    std::fs::write(path, &v).unwrap();
    v
}

fn guest_view_of(img: &Path) -> Vec<u8> {
    let raw = img.with_extension("guest.raw");
    run(Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(img).arg(&raw));
    std::fs::read(raw).unwrap()
}

/// Reads the whole device in odd-sized pieces (crossing clusters and subclusters) and through
/// the plan path, and compares with qemu's guest view; returns the blobs opened.
async fn assert_same(img: &Path, cache: &Path) -> Vec<String> {
    let want = guest_view_of(img);
    let files = Files { cache: cache.to_path_buf(), opened: Mutex::default() };
    let (_blob, view) = open_view(img.to_str().unwrap(), &[], &files).await.unwrap();
    common::assert_view_is(&view, &want, &img.display().to_string()).await;
    let opened = files.opened.lock().unwrap().clone();
    opened
}

#[tokio::test]
async fn qemu_images_read_as_qemu_reads_them() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    raw_disk(&raw, 6, 1);
    let variants: &[(&str, &[&str])] = &[
        ("plain", &["-O", "qcow2"]),
        ("small-clusters", &["-O", "qcow2", "-o", "cluster_size=4096"]),
        ("v2", &["-O", "qcow2", "-o", "compat=0.10"]),
        ("deflate", &["-c", "-O", "qcow2"]),
        ("zstd", &["-c", "-O", "qcow2", "-o", "compression_type=zstd"]),
        ("extended-l2", &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=128k"]),
        ("zstd-extended-l2", &["-c", "-O", "qcow2", "-o", "compression_type=zstd,extended_l2=on"]),
    ];
    for (name, args) in variants {
        let img = dir.path().join(format!("{name}.qcow2"));
        run(Command::new("qemu-img").arg("convert").args(*args).arg(&raw).arg(&img));
        // Zero clusters (v3) and a partial write over them.
        if *name != "v2" {
            run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -z 1M 512k", "-c", "write -P 0x5a 1100k 4k"]).arg(&img));
        }
        assert_same(&img, &dir.path().join(format!("cache-{name}"))).await;
    }
}

/// A chain: a raw base, a qcow2 over it, a qcow2 with subclusters over that, each naming the one
/// below by a relative name; writes of a few KiB leave subclusters of a cluster unallocated.
#[tokio::test]
async fn backing_chains_resolve_relative_names() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("layers")).unwrap();
    raw_disk(&dir.path().join("layers/base.raw"), 4, 2);
    let mid = dir.path().join("layers/mid.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw"]).arg(&mid));
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 64k 128k", "-c", "write -z 2M 64k"]).arg(&mid));
    let top = dir.path().join("layers/top.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2", "-o", "extended_l2=on", "-b", "mid.qcow2", "-F", "qcow2"])
        .arg(&top)
        .arg("6M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x22 100k 4k", "-c", "write -P 0x33 5M 8k", "-c", "write -z 3M 4k"])
        .arg(&top));
    let opened = assert_same(&top, &dir.path().join("cache")).await;
    assert_eq!(opened.len(), 3, "{opened:?}");
    assert!(opened[2].ends_with("layers/base.raw"), "{opened:?}");
}

fn set_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

async fn open_mem(bytes: Vec<u8>, cache: &Path) -> Result<lazy_image_engine::View> {
    let mem = Mem(HashMap::from([("/i/a.qcow2".to_string(), bytes)]), cache.to_path_buf());
    open_view("/i/a.qcow2", &[], &mem).await.map(|(_, v)| v)
}

fn small_image(dir: &Path, extra: &[&str]) -> Vec<u8> {
    let raw = dir.join("s.raw");
    raw_disk(&raw, 1, 3);
    let img = dir.join("s.qcow2");
    run(Command::new("qemu-img").args(["convert", "-O", "qcow2", "-o", "cluster_size=4096"]).args(extra).arg(&raw).arg(&img));
    std::fs::read(img).unwrap()
}

#[tokio::test]
async fn unsupported_and_broken_images_are_refused_precisely() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = small_image(dir.path(), &[]);
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation, ErrorKind, &str)> = vec![
        ("dirty", Box::new(|b| b[79] |= 1), ErrorKind::InvalidInput, "dirty"),
        ("corrupt bit", Box::new(|b| b[79] |= 2), ErrorKind::InvalidInput, "corrupt"),
        ("external data file", Box::new(|b| b[79] |= 4), ErrorKind::InvalidInput, "external data"),
        ("unknown feature", Box::new(|b| b[72] |= 0x80), ErrorKind::InvalidInput, "unknown incompatible"),
        ("encrypted", Box::new(|b| set_be32(b, 32, 1)), ErrorKind::InvalidInput, "encrypted"),
        ("version 4", Box::new(|b| set_be32(b, 4, 4)), ErrorKind::InvalidInput, "version 4"),
        ("huge clusters", Box::new(|b| set_be32(b, 20, 40)), ErrorKind::Integrity, "cluster_bits"),
        ("L1 too small", Box::new(|b| set_be32(b, 36, 0)), ErrorKind::Integrity, "too small"),
        ("L1 past the end", Box::new(|b| b[40] = 0x7f), ErrorKind::Integrity, "L1 table"),
    ];
    for (what, mutate, kind, says) in cases {
        let mut b = good.clone();
        mutate(&mut b);
        let e = open_mem(b, &dir.path().join(format!("c-{}", what.replace(' ', "-")))).await.map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), kind, "{what}: {}", e.report());
        assert!(e.report().contains(says), "{what}: {}", e.report());
    }
    // An image that names itself as its backing file: a loop, refused before it is opened twice.
    let base = dir.path().join("loop.qcow2");
    run(Command::new("qemu-img").args(["create", "-f", "qcow2", "-u", "-b", "loop.qcow2", "-F", "qcow2"]).arg(&base).arg("1M"));
    let files = Files { cache: dir.path().join("c-loop"), opened: Mutex::default() };
    let e = open_view(base.to_str().unwrap(), &[], &files).await.map(|_| ()).unwrap_err();
    assert!(e.report().contains("a loop"), "{}", e.report());
}

/// A remote image never names a local backing file, nor a local one a remote file.
#[test]
fn backing_names_stay_the_kind_of_their_child() {
    use lazy_image_formats::qcow2::resolve_backing;
    assert_eq!(resolve_backing("http://h/a/top.qcow2", "base.qcow2").unwrap(), "http://h/a/base.qcow2");
    assert_eq!(resolve_backing("https://h/a/top.qcow2", "../b/base").unwrap(), "https://h/b/base");
    assert!(resolve_backing("http://h/a/top.qcow2", "file:///etc/shadow").is_err());
    assert!(resolve_backing("http://h/a/top.qcow2", "/etc/shadow").is_ok_and(|u| u == "http://h/etc/shadow"));
    assert_eq!(resolve_backing("/data/img/top.qcow2", "base.raw").unwrap(), "/data/img/base.raw");
    assert_eq!(resolve_backing("file:///data/top.qcow2", "sub/base").unwrap(), "file:///data/sub/base");
    assert!(resolve_backing("/data/top.qcow2", "http://h/base").is_err());
}

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(CORPUS)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

/// The corpus in the tree reads as qemu read it when it was made (no qemu needed).
#[tokio::test]
async fn corpus_images_read_as_recorded() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let sums = std::fs::read_to_string(format!("{CORPUS}/guest-views.sha256")).unwrap();
    for line in sums.lines() {
        let (want, name) = line.split_once("  ").unwrap();
        // A cache of its own per image: the last image's blobs may still hold theirs.
        let files = Files { cache: dir.path().join(name), opened: Mutex::default() };
        let (_blob, view) = open_view(&format!("{CORPUS}/{name}"), &[], &files).await.unwrap();
        let bytes = view.read(0, view.size()).await.unwrap();
        assert_eq!(hex(&Sha256::digest(&bytes)), want, "{name}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]
    /// The corpus images with bytes of their first clusters (header, L1, L2, refcounts, the
    /// first data) changed: opening and reading every byte ends in bytes or an error, never a
    /// panic. Backing files resolve within the in-memory set.
    #[test]
    fn mutated_images_never_panic(which in 0usize..4, flips in proptest::collection::vec((0usize..24 * 1024, any::<u8>()), 1..12)) {
        let images = corpus();
        let (name, mut b) = images[which % images.len()].clone();
        for (at, x) in &flips {
            let i = at % b.len();
            b[i] ^= x | 1;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut set: HashMap<String, Vec<u8>> = images.into_iter().map(|(n, d)| (format!("/c/{n}"), d)).collect();
        set.insert(format!("/c/{name}"), b);
        let mem = Mem(set, dir.path().to_path_buf());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            if let Ok((_, view)) = open_view(&format!("/c/{name}"), &[], &mem).await {
                let size = view.size().min(4 << 20);
                let mut buf = vec![0u8; 16 << 10];
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
