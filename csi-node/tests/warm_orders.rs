//! The node's side of the NodeCache channel against an in-process API server and a real origin
//! on 127.0.0.1: the NodeCache is created and owned by the Node, a warm order fills the image's
//! cache and pins it, a withdrawn order lets eviction take it, reports follow the report policy,
//! and an API server that is down changes nothing the node holds.

use lazy_image_attach::{Backend, UblkOptions};
use lazy_image_csi_common::fake_api::FakeApi;
use lazy_image_csi_common::node_cache::NodeCache;
use lazy_image_csi_common::reports::ReportPolicy;
use lazy_image_csi_node::reporter::{Reporter, Timing};
use lazy_image_csi_node::volumes::{NodeConfig, Volumes};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NODE_PATH: &str = "/api/v1/nodes/n1";
const NC_PATH: &str = "/apis/lazy-image.csi.dev/v1alpha1/nodecaches/n1";
const MIB: usize = 1 << 20;

struct Setup {
    _tmp: tempfile::TempDir,
    server: lazy_image_serve::ServerHandle,
    fake: FakeApi,
    volumes: Arc<Volumes>,
    images: Vec<Vec<u8>>,
    cache: std::path::PathBuf,
}

async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let srv = tmp.path().join("srv");
    std::fs::create_dir_all(&srv).unwrap();
    let mut images = Vec::new();
    for (i, name) in ["a.img", "b.img"].iter().enumerate() {
        let data: Vec<u8> = (0..MIB).map(|j| ((j * 31 + i * 7) % 251) as u8).collect();
        std::fs::write(srv.join(name), &data).unwrap();
        images.push(data);
    }
    let server = lazy_image_serve::spawn(&srv, "127.0.0.1:0".parse().unwrap(), None).await.unwrap();
    let fake = FakeApi::new();
    fake.put(NODE_PATH, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "uid": "node-uid-1"}}));
    let cache = tmp.path().join("cache");
    let volumes = Volumes::new(NodeConfig {
        state_dir: tmp.path().join("state"),
        cache_dir: cache.clone(),
        // Room for one image and a half: the second evicts the first unless it is kept.
        cache_limit: Some((MIB + MIB / 2) as u64),
        backend: Backend::Fuse,
        ublk: UblkOptions::default(),
        max_volumes: 8,
        fd_holder: None,
        local: Default::default(),
    })
    .unwrap();
    Setup { _tmp: tmp, server, fake, volumes, images, cache }
}

/// A reporter that writes every change at once (no minimum interval, no heartbeat soon).
fn eager_reporter(s: &Setup) -> Reporter {
    let eager = Timing {
        policy: ReportPolicy { min_interval: Duration::ZERO, heartbeat: Duration::from_secs(3600) },
        poll: Duration::from_secs(1),
    };
    Reporter::new(s.fake.client(), "n1", s.volumes.clone(), eager)
}

fn order(s: &Setup, name: &str, file: &str) -> serde_json::Value {
    json!({"image": name, "attributes": {"url": s.server.url(file), "chunkSize": "64K"}})
}

fn set_orders(s: &Setup, orders: Vec<serde_json::Value>) {
    let mut nc = s.fake.get(NC_PATH).expect("the node created its NodeCache");
    nc["spec"] = json!({ "warm": orders });
    s.fake.put(NC_PATH, nc);
}

fn status(s: &Setup) -> serde_json::Value {
    s.fake.get(NC_PATH).and_then(|nc| nc.get("status").cloned()).unwrap_or_default()
}

/// Runs rounds until the report the API holds says `url` is cached whole (deadline 20 s).
async fn until_warm(s: &Setup, r: &mut Reporter, url: &str) {
    let t = Instant::now();
    loop {
        r.tick().await;
        let st = status(s);
        let img = &st["images"][url];
        if img["cachedBytes"].as_u64().is_some() && img["cachedBytes"] == img["sizeBytes"] {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{url} never reported warm: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn cache_dirs(s: &Setup) -> Vec<(String, bool, u64, u64)> {
    lazy_image_engine::cache::list_images(&s.cache)
        .unwrap()
        .into_iter()
        .map(|c| (c.header.url.clone(), c.pinned, c.chunks_present, c.header.chunks()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_fill_pin_and_release_and_reports_follow_the_policy() {
    let s = setup().await;
    let mut r = eager_reporter(&s);

    // First round: the NodeCache is made, owned by its Node, and the first report written.
    r.tick().await;
    let nc: NodeCache = serde_json::from_value(s.fake.get(NC_PATH).unwrap()).unwrap();
    let owner = &nc.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Node", "node-uid-1"));
    assert_eq!(status(&s)["orders"], 0);
    assert!(status(&s)["reportedAt"].is_string());
    assert_eq!(status(&s)["cacheFreeBytes"], (MIB + MIB / 2) as u64);

    // An order to warm a: the whole image is fetched, pinned and reported.
    let (a, b) = (s.server.url("a.img"), s.server.url("b.img"));
    set_orders(&s, vec![order(&s, "model-a", "a.img")]);
    until_warm(&s, &mut r, &a).await;
    assert_eq!(status(&s)["orders"], 1);
    assert_eq!(status(&s)["images"][&a]["volumes"], 0, "an order is not a volume");
    let metrics = lazy_image_csi_node::metrics::render(&s.volumes);
    assert!(metrics.contains("\nlazy_image_warm_orders 1\n"), "{metrics}");
    let writes = s.fake.writes("nodecaches/n1/status");
    assert!(metrics.contains(&format!("\nlazy_image_cache_report_writes_total {writes}\n")), "{writes} writes: {metrics}");
    // On disk too, once the flusher has written the bitmap.
    let t = Instant::now();
    let dirs = loop {
        let dirs = cache_dirs(&s);
        if dirs.len() == 1 && dirs[0].2 == dirs[0].3 {
            break dirs;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the cache on disk never became whole: {dirs:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(dirs[0].1, "pinned: {dirs:?}");
    let dir = lazy_image_engine::cache::list_images(&s.cache).unwrap()[0].dir.clone();
    let cached = std::fs::read(dir.join(lazy_image_engine::cache::DATA_FILE)).unwrap();
    assert!(cached[..MIB] == s.images[0][..], "the cache holds the image's bytes");

    // A bad order fails alone, with the reason in the report.
    set_orders(&s, vec![order(&s, "model-a", "a.img"), json!({"image": "bad", "attributes": {"url": "ftp://x"}})]);
    r.tick().await;
    let why = status(&s)["failedOrders"]["bad"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("http://"), "{why}");
    assert_eq!(status(&s)["orders"], 1);

    // a withdrawn, b ordered: a is unpinned first, so b's room comes from evicting a.
    set_orders(&s, vec![order(&s, "model-b", "b.img")]);
    until_warm(&s, &mut r, &b).await;
    let dirs = cache_dirs(&s);
    assert_eq!(dirs.len(), 1, "a was evicted: {dirs:?}");
    assert_eq!(dirs[0].0, b);
    assert!(status(&s)["images"].get(&a).is_none());

    // With a long minimum interval, a change waits: no write, and the next round comes soon.
    let slow = Timing {
        policy: ReportPolicy { min_interval: Duration::from_secs(3600), heartbeat: Duration::from_secs(7200) },
        poll: Duration::from_secs(5),
    };
    let mut r2 = Reporter::new(s.fake.client(), "n1", s.volumes.clone(), slow);
    r2.tick().await;
    assert_eq!(r2.writes, 1, "the first report of a new reporter");
    let writes = s.fake.writes("nodecaches/n1/status");
    set_orders(&s, vec![]);
    let wait = r2.tick().await;
    assert_eq!(s.fake.writes("nodecaches/n1/status"), writes, "a change within the minimum interval was written");
    assert!(wait <= Duration::from_secs(5), "{wait:?}");
    assert_eq!(s.volumes.orders_held().await, 0, "orders are carried out whether or not a report is due");

    // The API server down: the round fails, and what the node holds stays as it is.
    set_orders(&s, vec![order(&s, "model-b", "b.img")]);
    r.tick().await;
    assert_eq!(s.volumes.orders_held().await, 1);
    s.fake.set_down(true);
    assert_eq!(r.tick().await, Duration::from_secs(1), "the next round at the poll interval");
    assert_eq!(s.volumes.orders_held().await, 1, "a down API server withdrew an order");
    assert!(cache_dirs(&s)[0].1, "still pinned");
}

/// A warm order for a registry image (an OverlayBD base layer and a diff layer on it, from the
/// test server laid out as a registry) fills and pins every layer's blob; withdrawn, it unpins
/// them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_for_a_registry_image_warms_every_layer() {
    use sha2::{Digest, Sha256};
    let s = setup().await;
    let mut r = eager_reporter(&s);
    r.tick().await;
    let (a, b) = (&s.images[0][..MIB / 2], &s.images[1][..MIB / 2]);
    let layer = |image: &[u8], base: Option<&[u8]>| {
        let mut out = std::io::Cursor::new(Vec::new());
        let mut base = base.map(std::io::Cursor::new);
        lazy_image_formats::overlaybd::lsmt::write_layer(
            &mut std::io::Cursor::new(image),
            base.as_mut().map(|c| c as &mut dyn std::io::Read),
            &mut out,
        )
        .unwrap();
        out.into_inner()
    };
    let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let repo = s._tmp.path().join("srv/v2/team/stack");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("manifests")).unwrap();
    let mut descs = Vec::new();
    for l in [layer(a, None), layer(b, Some(a))] {
        std::fs::write(repo.join("blobs").join(digest(&l)), &l).unwrap();
        descs.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(&l), "size": l.len(),
                          "annotations": {"containerd.io/snapshot/overlaybd/blob-digest": digest(&l)}}));
    }
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                          "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": digest(b"{}"), "size": 2}, "layers": descs});
    std::fs::write(repo.join("manifests/v1"), serde_json::to_vec(&manifest).unwrap()).unwrap();
    let url = format!("oci+http://{}/team/stack:v1", s.server.addr);
    set_orders(&s, vec![json!({"image": "stack", "attributes": {"url": url}})]);
    let t = Instant::now();
    loop {
        r.tick().await;
        let dirs = cache_dirs(&s);
        if dirs.len() == 2 && dirs.iter().all(|d| d.1 && d.2 == d.3) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "both layers never became whole and pinned: {dirs:?}\n{}", status(&s));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set_orders(&s, vec![]);
    r.tick().await;
    assert!(cache_dirs(&s).iter().all(|d| !d.1), "withdrawn: every layer unpinned: {:?}", cache_dirs(&s));
}
