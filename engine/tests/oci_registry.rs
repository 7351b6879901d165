//! Registry behaviour a real registry does not show on loopback, from our fault-injecting
//! server laid out as a registry: a 429 with Retry-After, a 401 answered by a token service
//! (and a token that expires mid-read), blobs behind one-use storage redirects, platform choice
//! in an image index, a manifest or blob whose bytes are not their digest.

use lazy_image_engine::oci::{host_platform, Credentials, Reference, Registry};
use lazy_image_engine::{ErrorKind, ImageConfig, LazyImage};
use lazy_image_serve::Faults;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn digest_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

/// Stores `bytes` as blob `name` (its digest unless told otherwise) of `repo`.
fn put(root: &Path, repo: &str, kind: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(format!("v2/{repo}/{kind}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn manifest(layers: &[(&str, u64)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(d, s)| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(b"{}"), "size": 2},
        "layers": layers,
    }))
    .unwrap()
}

fn config(dir: &Path, digest: &str) -> ImageConfig {
    let mut cfg = ImageConfig::new(dir);
    cfg.chunk_size = 64 << 10;
    cfg.readahead_max = 0;
    cfg.max_request = 64 << 10;
    cfg.startup_misses = 0;
    cfg.flush_interval = Duration::from_millis(20);
    cfg.blob_digest = Some(digest.to_string());
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_throttling_and_one_use_redirects() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("srv");
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let d = digest_of(&data);
    put(&root, "team/data", "blobs", &d, &data);
    put(&root, "team/data", "manifests", "v1", &manifest(&[(&d, data.len() as u64)]));
    std::fs::write(root.join("token"), br#"{"token":"T1"}"#).unwrap();
    let faults = Arc::new(Faults::new());
    let srv = lazy_image_serve::spawn(&root, "127.0.0.1:0".parse().unwrap(), Some(faults.clone())).await.unwrap();
    *faults.require_auth.lock().unwrap() = Some("Bearer T1".into());
    *faults.challenge.lock().unwrap() =
        Some(format!(r#"Bearer realm="http://{}/token",service="fake",scope="repository:team/data:pull""#, srv.addr));
    *faults.auth_exempt.lock().unwrap() = Some("/token".into());
    *faults.redirect_paths.lock().unwrap() = Some("/blobs/".into());
    faults.status_429.store(1, SeqCst);

    let reg = Arc::new(Registry::new(Reference::parse(&format!("oci+http://{}/team/data:v1", srv.addr)).unwrap(), None).unwrap());
    let resolved = reg.resolve().await.unwrap();
    assert_eq!(faults.status_429.load(SeqCst), 0, "the 429 was met and waited out");
    assert_eq!(resolved.layers.len(), 1);
    let img = LazyImage::open(Arc::new(reg.blob_source(&resolved.layers[0])), config(&tmp.path().join("c"), &d)).await.unwrap();
    assert_eq!(&img.read(0, 300_000).await.unwrap()[..], &data[..300_000]);

    // The token expires: the registry now wants another, which the token service hands out.
    std::fs::write(root.join("token"), br#"{"token":"T2"}"#).unwrap();
    *faults.require_auth.lock().unwrap() = Some("Bearer T2".into());
    assert_eq!(&img.read(300_000, 700_000).await.unwrap()[..], &data[300_000..]);
    // Every range went through a storage URL of its own (a reused one gets 403).
    assert!(faults.redirects.load(SeqCst) >= 16, "{} redirects", faults.redirects.load(SeqCst));
    let deadline = Instant::now() + Duration::from_secs(10);
    while img.fill().0 < img.fill().1 || img.condition().abnormal {
        assert!(Instant::now() < deadline, "{:?}", img.condition());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!img.condition().abnormal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_their_digest_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("srv");
    let data = vec![7u8; 200_000];
    let claimed = digest_of(b"other bytes");
    put(&root, "r", "blobs", &claimed, &data);
    put(&root, "r", "manifests", "v1", &manifest(&[(&claimed, data.len() as u64)]));
    let m = manifest(&[(&claimed, data.len() as u64)]);
    let wrong = digest_of(b"not this manifest");
    put(&root, "r", "manifests", &wrong, &m);
    let srv = lazy_image_serve::spawn(&root, "127.0.0.1:0".parse().unwrap(), None).await.unwrap();

    let pinned = Registry::new(Reference::parse(&format!("oci+http://{}/r@{wrong}", srv.addr)).unwrap(), None).unwrap();
    let e = pinned.resolve().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");

    let reg = Arc::new(Registry::new(Reference::parse(&format!("oci+http://{}/r:v1", srv.addr)).unwrap(), None).unwrap());
    let layer = reg.resolve().await.unwrap().layers.remove(0);
    let img = LazyImage::open(Arc::new(reg.blob_source(&layer)), config(&tmp.path().join("c"), &claimed)).await.unwrap();
    img.read(0, data.len() as u64).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !img.condition().abnormal {
        assert!(Instant::now() < deadline, "the blob was never checked");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(img.condition().message.contains("not its digest"), "{:?}", img.condition());
    assert_eq!(img.read(0, 10).await.unwrap_err().kind(), ErrorKind::Integrity);
}

#[tokio::test]
async fn an_index_gives_this_machines_platform() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("srv");
    let (os, arch) = host_platform();
    let mut wanted = None;
    let mut entries = Vec::new();
    for (i, a) in ["s390x", arch].iter().enumerate() {
        let layer = vec![i as u8 + 1; 1000];
        let ld = digest_of(&layer);
        put(&root, "multi", "blobs", &ld, &layer);
        let m = manifest(&[(&ld, 1000)]);
        let md = digest_of(&m);
        put(&root, "multi", "manifests", &md, &m);
        entries.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": m.len(), "platform": {"os": os, "architecture": a}}));
        if *a == arch {
            wanted = Some(ld);
        }
    }
    let index = |e: &[serde_json::Value]| {
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": e}))
            .unwrap()
    };
    put(&root, "multi", "manifests", "v1", &index(&entries));
    put(&root, "multi", "manifests", "other", &index(&entries[..1]));
    let srv = lazy_image_serve::spawn(&root, "127.0.0.1:0".parse().unwrap(), None).await.unwrap();
    let resolve = |tag: &str| {
        let r = Reference::parse(&format!("oci+http://{}/multi:{tag}", srv.addr)).unwrap();
        async move { Registry::new(r, None).unwrap().resolve().await }
    };
    assert_eq!(resolve("v1").await.unwrap().layers[0].digest, wanted.unwrap());
    let e = resolve("other").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(e.to_string().contains("s390x"), "{e}");
}

/// A token given by the user (a node-stage secret's bearerToken) is the registry's token: no
/// token service is asked; a wrong one fails with a sentence.
#[tokio::test]
async fn a_given_token_is_used_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("srv");
    let layer = vec![5u8; 5000];
    let d = digest_of(&layer);
    put(&root, "p", "blobs", &d, &layer);
    put(&root, "p", "manifests", "v1", &manifest(&[(&d, 5000)]));
    let faults = Arc::new(Faults::new());
    let srv = lazy_image_serve::spawn(&root, "127.0.0.1:0".parse().unwrap(), Some(faults.clone())).await.unwrap();
    *faults.require_auth.lock().unwrap() = Some("Bearer given".into());
    *faults.challenge.lock().unwrap() = Some(r#"Bearer realm="http://127.0.0.1:9/nowhere",service="fake""#.into());
    let reference = Reference::parse(&format!("oci+http://{}/p:v1", srv.addr)).unwrap();
    let reg = Registry::new(reference.clone(), Some(Credentials::Bearer("given".into()))).unwrap();
    assert_eq!(reg.resolve().await.unwrap().layers[0].digest, d);
    let wrong = Registry::new(reference, Some(Credentials::Bearer("stale".into()))).unwrap();
    let e = wrong.resolve().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::OriginStatus(401), "{e}");
    assert!(e.to_string().contains("refused access to repository p with the credentials given"), "{e}");
}

/// A per-chunk manifest pushed beside a layer: each chunk is checked as it arrives, so a
/// corrupt chunk fails its read at once (not only once the whole blob is hashed), and the
/// chunks around it still read. A chunk manifest for a layer the image lacks is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_manifests_verify_layers_chunk_by_chunk() {
    use lazy_image_engine::oci::{CHUNK_MANIFEST_FOR, CHUNK_MANIFEST_MEDIA_TYPE};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("srv");
    let data: Vec<u8> = (0..1_048_576u32).map(|i| (i * 7 % 253) as u8).collect();
    let d = digest_of(&data);
    let m = lazy_image_engine::Manifest::build(&data[..], 64 << 10, |_| {}).unwrap().to_bytes();
    let md = digest_of(&m);
    let mut served = data.clone();
    served[3 * 65536 + 10] ^= 0xff;
    put(&root, "v", "blobs", &d, &served);
    put(&root, "v", "blobs", &md, &m);
    let image = |vouches_for: &str| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(b"{}"), "size": 2},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": data.len()},
                {"mediaType": CHUNK_MANIFEST_MEDIA_TYPE, "digest": md, "size": m.len(), "annotations": {CHUNK_MANIFEST_FOR: vouches_for}},
            ],
        }))
        .unwrap()
    };
    put(&root, "v", "manifests", "v1", &image(&d));
    put(&root, "v", "manifests", "stray", &image(&digest_of(b"no such layer")));
    let srv = lazy_image_serve::spawn(&root, "127.0.0.1:0".parse().unwrap(), None).await.unwrap();
    let reg = Arc::new(Registry::new(Reference::parse(&format!("oci+http://{}/v:v1", srv.addr)).unwrap(), None).unwrap());
    let layer = reg.resolve().await.unwrap().layers.remove(0);
    assert_eq!(layer.chunk_manifest, Some((md.clone(), m.len() as u64)));
    let mut cfg = config(&tmp.path().join("c"), &d);
    cfg.manifest = reg.chunk_manifest(&layer).await.unwrap();
    let img = LazyImage::open(Arc::new(reg.blob_source(&layer)), cfg).await.unwrap();
    assert_eq!(&img.read(0, 65536).await.unwrap()[..], &data[..65536]);
    let e = img.read(3 * 65536, 4096).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Integrity, "{e}");
    assert_eq!(&img.read(5 * 65536, 65536).await.unwrap()[..], &data[5 * 65536..6 * 65536]);

    let stray = Registry::new(Reference::parse(&format!("oci+http://{}/v:stray", srv.addr)).unwrap(), None).unwrap();
    let e = stray.resolve().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("not one of its layers"), "{e}");
}
