//! The placement pass against an in-process API server: warm orders issued to the chosen nodes'
//! NodeCaches, progress in the LazyImage's status, warm node labels kept in step and bounded,
//! node loss and stale reports replaced, a policy shrink, deletion withdrawing everything before
//! the finalizer goes, no writes when nothing changed, and writes paced.

use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Recorder, Reporter};
use lazy_image_csi_common::fake_api::FakeApi;
use lazy_image_csi_controller::crd::{LazyImage, LazyImageSpec, WarmMode, WarmPolicy};
use lazy_image_csi_controller::reconcile::{self, Context, Metrics, FINALIZER};
use lazy_image_csi_controller::warm::{Placer, WarmConfig, LABEL_PREFIX};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

const LI: &str = "/apis/lazy-image.csi.dev/v1alpha1/lazyimages";
const NC: &str = "/apis/lazy-image.csi.dev/v1alpha1/nodecaches";
const NODES: &str = "/api/v1/nodes";
const SIZE: u64 = 1 << 30;

fn url(image: &str) -> String {
    format!("http://127.0.0.1:1/{image}.img")
}

fn put_node(f: &FakeApi, name: &str, zone: &str) {
    f.put(
        &format!("{NODES}/{name}"),
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone, "pool": "gpu"}},
               "status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
    );
}

/// A NodeCache reporting `images` (name -> cached bytes of SIZE) and `free` bytes of room,
/// reported at `at`; its orders kept as they are.
fn report(f: &FakeApi, node: &str, images: &[(&str, u64)], free: u64, at: Timestamp) {
    let path = format!("{NC}/{node}");
    let mut nc = f.get(&path).unwrap_or_else(
        || json!({"apiVersion": "lazy-image.csi.dev/v1alpha1", "kind": "NodeCache", "metadata": {"name": node}, "spec": {"warm": []}}),
    );
    let imgs: BTreeMap<String, Value> =
        images.iter().map(|(i, c)| (url(i), json!({"url": url(i), "sizeBytes": SIZE, "cachedBytes": c, "volumes": 0}))).collect();
    nc["status"] = json!({"images": imgs, "cacheFreeBytes": free, "orders": 0, "reportedAt": at.to_string()});
    f.put(&path, nc);
}

fn put_image(f: &FakeApi, name: &str, max: Option<u32>) {
    let mut li = LazyImage::new(
        name,
        LazyImageSpec {
            url: url(name),
            format: None,
            digest: None,
            manifest_url: None,
            chunk_size: None,
            credentials_secret_ref: None,
            warm: WarmPolicy {
                mode: WarmMode::Nodes,
                node_selector: BTreeMap::from([("pool".into(), "gpu".into())]),
                max_nodes: max,
                spread_by: Some("topology.kubernetes.io/zone".into()),
            },
        },
    );
    li.metadata.finalizers = Some(vec![FINALIZER.into()]);
    f.put(&format!("{LI}/{name}"), serde_json::to_value(li).unwrap());
}

fn ordered(f: &FakeApi, image: &str) -> Vec<String> {
    let mut out = Vec::new();
    for n in ["a1", "a2", "b1", "b2", "n1"] {
        if let Some(nc) = f.get(&format!("{NC}/{n}")) {
            if nc["spec"]["warm"].as_array().into_iter().flatten().any(|o| o["image"] == image) {
                out.push(n.to_string());
            }
        }
    }
    out
}

fn labels(f: &FakeApi, node: &str) -> Vec<String> {
    let n = f.get(&format!("{NODES}/{node}")).unwrap_or_default();
    n["metadata"]["labels"].as_object().into_iter().flatten().filter(|(k, _)| k.starts_with(LABEL_PREFIX)).map(|(k, _)| k.clone()).collect()
}

fn status(f: &FakeApi, image: &str) -> Value {
    f.get(&format!("{LI}/{image}")).map(|li| li["status"].clone()).unwrap_or_default()
}

fn placer(f: &FakeApi, cfg: WarmConfig) -> Arc<Placer> {
    let client = f.client();
    let recorder = Recorder::new(client.clone(), Reporter { controller: "test".into(), instance: None });
    Arc::new(Placer::new(client, recorder, Arc::new(Metrics::default()), cfg))
}

struct NoOrigin;

#[async_trait::async_trait]
impl lazy_image_csi_controller::origin::Origin for NoOrigin {
    async fn probe(
        &self,
        url: &str,
        _c: Option<&lazy_image_csi_common::attributes::Credentials>,
    ) -> lazy_image_csi_controller::error::Result<lazy_image_engine::ImageInfo> {
        panic!("a deleted image's origin was probed: {url}");
    }
}

#[tokio::test]
async fn orders_status_labels_loss_shrink_and_deletion() {
    let f = FakeApi::new();
    let now = Timestamp::now();
    for (n, z) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b")] {
        put_node(&f, n, z);
    }
    // a2 has half the image; in zone b, b2 has the most room.
    report(&f, "a1", &[], 100 << 30, now);
    report(&f, "a2", &[("model", SIZE / 2)], 10 << 30, now);
    report(&f, "b1", &[], 10 << 30, now);
    report(&f, "b2", &[], 500 << 30, now);
    put_image(&f, "model", Some(2));
    let p = placer(&f, WarmConfig::default());

    let out = p.pass().await.unwrap();
    assert_eq!(out.failed, 0);
    assert_eq!(ordered(&f, "model"), ["a2", "b2"]);
    let order = &f.get(&format!("{NC}/a2")).unwrap()["spec"]["warm"][0];
    assert_eq!(order["attributes"]["url"], url("model"));
    let st = status(&f, "model");
    assert_eq!((st["orderedNodes"].as_u64(), st["warmNodes"].as_u64(), st["cachedBytes"].as_u64()), (Some(2), Some(0), Some(SIZE / 2)));
    assert!(labels(&f, "a2").is_empty(), "labelled before it is warm");
    let events: Vec<Value> = f.log().into_iter().filter(|(_, p, _)| p.contains("/events")).map(|(_, _, b)| b).collect();
    assert_eq!(events.len(), 1);
    assert!(events[0]["note"].as_str().unwrap().contains("ordered warm on a2, b2"), "{}", events[0]);

    // Nothing changed: nothing written.
    assert_eq!(p.pass().await.unwrap().writes, 0);

    // Both report the image whole: labelled, and counted warm.
    report(&f, "a2", &[("model", SIZE)], 9 << 30, now);
    report(&f, "b2", &[("model", SIZE)], 499 << 30, now);
    p.pass().await.unwrap();
    let key = format!("{LABEL_PREFIX}model");
    assert_eq!(labels(&f, "a2"), std::slice::from_ref(&key));
    assert_eq!(labels(&f, "b2"), std::slice::from_ref(&key));
    assert_eq!(status(&f, "model")["warmNodes"], 2);
    assert_eq!(status(&f, "model")["nodes"][0]["fillPercent"], 100);

    // b2 leaves the cluster: b1 takes its place; b2's NodeCache no longer orders it.
    f.remove(&format!("{NODES}/b2"));
    p.pass().await.unwrap();
    assert_eq!(ordered(&f, "model"), ["a2", "b1"]);
    // a2's plugin stops reporting: a1 takes its place, and a2 loses its label.
    report(&f, "a2", &[("model", SIZE)], 9 << 30, Timestamp::from_second(now.as_second() - 3 * 3600).unwrap());
    p.pass().await.unwrap();
    assert_eq!(ordered(&f, "model"), ["a1", "b1"]);
    assert!(labels(&f, "a2").is_empty());

    // The policy shrinks to one node.
    report(&f, "a1", &[("model", SIZE)], 1 << 30, now);
    p.pass().await.unwrap();
    assert_eq!(labels(&f, "a1"), std::slice::from_ref(&key));
    put_image(&f, "model", Some(1));
    p.pass().await.unwrap();
    assert_eq!(ordered(&f, "model"), ["a1"], "the warm one of those ordered stays");
    assert_eq!(status(&f, "model")["orderedNodes"], 1);

    // Deleted: the finalizer's cleanup withdraws orders and labels, then lets it go.
    let mut li = f.get(&format!("{LI}/model")).unwrap();
    li["metadata"]["deletionTimestamp"] = json!(now.to_string());
    f.put(&format!("{LI}/model"), li.clone());
    let client = f.client();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter { controller: "test".into(), instance: None }),
        client,
        cluster: Arc::new(lazy_image_csi_controller::cluster::NoCluster),
        origin: Arc::new(NoOrigin),
        metrics: Arc::new(Metrics::default()),
        placer: Some(p.clone()),
    });
    let obj: LazyImage = serde_json::from_value(f.get(&format!("{LI}/model")).unwrap()).unwrap();
    reconcile::reconcile(Arc::new(obj), ctx).await.unwrap();
    assert!(ordered(&f, "model").is_empty());
    for n in ["a1", "a2", "b1"] {
        assert!(labels(&f, n).is_empty(), "{n} still labelled");
    }
    let left = f.get(&format!("{LI}/model")).unwrap();
    assert!(left["metadata"]["finalizers"].as_array().is_none_or(|a| a.is_empty()), "{left}");
}

#[tokio::test]
async fn warm_labels_are_bounded_per_node() {
    let f = FakeApi::new();
    put_node(&f, "n1", "a");
    let names: Vec<String> = (0..20).map(|i| format!("img{i:02}")).collect();
    let held: Vec<(&str, u64)> = names.iter().map(|n| (n.as_str(), SIZE)).collect();
    report(&f, "n1", &held, 1 << 40, Timestamp::now());
    for n in &names {
        put_image(&f, n, Some(1));
    }
    let p = placer(&f, WarmConfig { max_labels: 16, ..WarmConfig::default() });
    p.pass().await.unwrap();
    let mut l = labels(&f, "n1");
    l.sort();
    let want: Vec<String> = names[..16].iter().map(|n| format!("{LABEL_PREFIX}{n}")).collect();
    assert_eq!(l, want, "the first 16 by name");
    assert_eq!(f.get(&format!("{NC}/n1")).unwrap()["spec"]["warm"].as_array().unwrap().len(), 20, "every image is ordered all the same");
    // A label someone else set under our prefix, for no image, goes.
    let mut node = f.get(&format!("{NODES}/n1")).unwrap();
    node["metadata"]["labels"][format!("{LABEL_PREFIX}gone")] = json!("true");
    f.put(&format!("{NODES}/n1"), node);
    p.pass().await.unwrap();
    assert_eq!(labels(&f, "n1").len(), 16);
}

/// 60 images on one node: 121 writes (one NodeCache, 60 statuses, 60 events) at 10/s with a
/// burst of 20 take at least 10 s (of tokio's paused clock).
#[tokio::test(start_paused = true)]
async fn writes_are_paced() {
    let f = FakeApi::new();
    put_node(&f, "n1", "a");
    report(&f, "n1", &[], 1 << 40, Timestamp::now());
    for i in 0..60 {
        put_image(&f, &format!("img{i:02}"), Some(1));
    }
    let p = placer(&f, WarmConfig { writes_per_s: 10.0, write_burst: 20.0, ..WarmConfig::default() });
    let t = tokio::time::Instant::now();
    let out = p.pass().await.unwrap();
    assert_eq!(out.writes, 121);
    let took = t.elapsed().as_secs_f64();
    assert!((10.0..11.0).contains(&took), "{took} s");
}
