//! The placement pass: keeps every LazyImage with a warm policy cached where `placement` says,
//! through the nodes' NodeCache resources. One pass reads the LazyImages, the Nodes and the
//! NodeCaches, decides (`plan`, pure), and writes only the differences, paced:
//! - orders: each NodeCache's `spec.warm` lists the images that node is to keep warm;
//! - status: each LazyImage's `orderedNodes`, `warmNodes`, `cachedBytes`, `nodes`, `warmProblem`;
//! - node labels: `warm.lazy-image.csi.dev/<image>: "true"` on the nodes ordered to keep that
//!   image and holding it whole, at most `max_labels` per node (images by name), so pods can
//!   prefer warm nodes with a plain node affinity;
//! - an Event on the LazyImage when its orders change.
//!
//! A LazyImage being deleted wants no node: its finalizer waits until a pass has withdrawn its
//! orders and labels. Passes run one at a time; the leader runs one every `every`.

use crate::crd::{LazyImage, NodeCache as NodeEntry, WarmMode, MAX_NODE_ENTRIES};
use crate::placement::{self, NodeView};
use crate::reconcile::Metrics;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use lazy_image_csi_common::api_call;
use lazy_image_csi_common::node_cache::{NodeCache, WarmOrder, STALE_AFTER};
use lazy_image_csi_common::reports::{aggregate, NodeReport, Pacer};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// The node label of a warm image: this prefix and the LazyImage's name.
pub const LABEL_PREFIX: &str = "warm.lazy-image.csi.dev/";

#[derive(Debug, Clone, Copy)]
pub struct WarmConfig {
    /// Warm labels per node at most.
    pub max_labels: usize,
    /// Writes per second on average, and in a burst.
    pub writes_per_s: f64,
    pub write_burst: f64,
    /// Time between two passes.
    pub every: Duration,
}

impl Default for WarmConfig {
    fn default() -> Self {
        WarmConfig { max_labels: 16, writes_per_s: 10.0, write_burst: 20.0, every: Duration::from_secs(30) }
    }
}

/// The fields of a LazyImage's status this pass owns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmStatus {
    pub ordered_nodes: u32,
    pub warm_nodes: u32,
    pub cached_bytes: u64,
    pub nodes: Vec<NodeEntry>,
    pub warm_problem: Option<String>,
}

impl WarmStatus {
    fn of(li: &LazyImage) -> Self {
        let s = li.status.clone().unwrap_or_default();
        WarmStatus {
            ordered_nodes: s.ordered_nodes,
            warm_nodes: s.warm_nodes,
            cached_bytes: s.cached_bytes,
            nodes: s.nodes,
            warm_problem: s.warm_problem,
        }
    }
}

/// What one pass writes.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// NodeCache name -> its new orders, and the resourceVersion they were decided on.
    pub orders: BTreeMap<String, (Vec<WarmOrder>, Option<String>)>,
    /// LazyImage name -> its new warm status.
    pub status: BTreeMap<String, WarmStatus>,
    /// Node name -> label changes (`None`: remove).
    pub labels: BTreeMap<String, BTreeMap<String, Option<String>>>,
    /// LazyImage name -> (nodes newly ordered, nodes withdrawn).
    pub changes: BTreeMap<String, (Vec<String>, Vec<String>)>,
}

impl Plan {
    pub fn writes(&self) -> usize {
        self.orders.len() + self.status.len() + self.labels.len() + self.changes.len()
    }
}

/// The label of image `name`, if its name can be a label's name (at most 63 characters).
pub fn label_key(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    ok.then(|| format!("{LABEL_PREFIX}{name}"))
}

fn node_ready(n: &Node) -> bool {
    let schedulable = !n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false);
    let ready =
        n.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    schedulable && ready && n.metadata.deletion_timestamp.is_none()
}

/// Whether a report written at `at` (RFC 3339) is recent at `now`.
fn fresh(at: Option<&str>, now: k8s_openapi::jiff::Timestamp) -> bool {
    let Some(t) = at.and_then(|a| a.parse::<k8s_openapi::jiff::Timestamp>().ok()) else { return false };
    now.duration_since(t).as_secs() < STALE_AFTER.as_secs() as i64
}

/// Decides a pass, from the cluster as listed at `now`.
pub fn plan(images: &[LazyImage], nodes: &[Node], caches: &[NodeCache], now: k8s_openapi::jiff::Timestamp, max_labels: usize) -> Plan {
    let mut out = Plan::default();
    let nodes_by: BTreeMap<String, &Node> = nodes.iter().map(|n| (n.name_any(), n)).collect();
    let empty = NodeReport::default();
    let reports: BTreeMap<String, &NodeReport> =
        caches.iter().map(|c| (c.name_any(), c.status.as_ref().map_or(&empty, |s| &s.report))).collect();
    let live: BTreeSet<String> = caches
        .iter()
        .filter(|c| nodes_by.get(&c.name_any()).is_some_and(|n| node_ready(n)))
        .filter(|c| fresh(c.status.as_ref().and_then(|s| s.reported_at.as_deref()), now))
        .map(|c| c.name_any())
        .collect();
    let mut new_orders: BTreeMap<String, Vec<WarmOrder>> = caches.iter().map(|c| (c.name_any(), c.spec.warm.clone())).collect();
    // Images by name: the first `max_labels` warm ones on a node get its labels.
    let mut warm_labels: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut sorted: Vec<&LazyImage> = images.iter().collect();
    sorted.sort_by_key(|li| li.name_any());
    for li in sorted {
        let name = li.name_any();
        let policy = &li.spec.warm;
        let deleting = li.metadata.deletion_timestamp.is_some();
        let mut problem = None;
        let wanted = policy.mode == WarmMode::Nodes && !deleting;
        let current: BTreeSet<String> =
            caches.iter().filter(|c| c.spec.warm.iter().any(|o| o.image == name)).map(|c| c.name_any()).collect();
        let next = if !wanted {
            BTreeSet::new()
        } else if li.spec.credentials_secret_ref.is_some() {
            problem = Some("images with credentialsSecretRef are not warmed: nodes get credentials only with a volume".to_string());
            BTreeSet::new()
        } else {
            let views: Vec<NodeView> = caches
                .iter()
                .filter(|c| live.contains(&c.name_any()))
                .filter_map(|c| {
                    let n = nodes_by.get(&c.name_any())?;
                    let r = reports.get(&c.name_any()).copied().unwrap_or(&empty);
                    let fill = r.images.get(&li.spec.url).map_or(0.0, |i| {
                        if i.size_bytes == 0 {
                            1.0
                        } else {
                            i.cached_bytes as f64 / i.size_bytes as f64
                        }
                    });
                    Some(NodeView { name: c.name_any(), labels: n.labels().clone(), ready: true, fill, free_cache: r.cache_free_bytes })
                })
                .collect();
            let next = placement::place(policy, &views, &current);
            if let Some(max) = policy.max_nodes {
                if (next.len() as u32) < max {
                    problem = Some(format!("{} of {max} nodes: no more nodes match, are ready and report their caches", next.len()));
                }
            }
            next
        };
        let (add, drop) = placement::orders(&current, &next);
        let order = WarmOrder { image: name.clone(), attributes: li.spec.attributes().into_iter().collect() };
        for (node, list) in new_orders.iter_mut() {
            list.retain(|o| o.image != name);
            if next.contains(node) {
                list.push(order.clone());
                list.sort_by(|a, b| a.image.cmp(&b.image));
            }
        }
        if !add.is_empty() || !drop.is_empty() {
            out.changes.insert(name.clone(), (add, drop));
        }
        // Failures the ordered nodes report.
        for node in &next {
            if let Some(why) = reports.get(node).and_then(|r| r.failed_orders.get(&name)) {
                problem.get_or_insert_with(|| format!("node {node}: {why}"));
            }
        }
        let (warm, bytes, top) = aggregate(&li.spec.url, reports.iter().map(|(n, r)| (n.as_str(), *r)), MAX_NODE_ENTRIES);
        if wanted && problem.is_none() && label_key(&name).is_none() {
            problem = Some("the name is longer than 63 characters: no warm node label".into());
        }
        if wanted {
            for node in &next {
                let is_whole = reports
                    .get(node)
                    .and_then(|r| r.images.get(&li.spec.url))
                    .is_some_and(|r| r.size_bytes > 0 && r.cached_bytes >= r.size_bytes);
                if is_whole {
                    warm_labels.entry(node.clone()).or_default().push(name.clone());
                }
            }
        }
        let status = WarmStatus {
            ordered_nodes: next.len() as u32,
            warm_nodes: warm,
            cached_bytes: bytes,
            nodes: top
                .into_iter()
                .map(|(node, r)| NodeEntry {
                    node,
                    cached_bytes: r.cached_bytes,
                    fill_percent: (r.cached_bytes.min(r.size_bytes) * 100).checked_div(r.size_bytes).map_or(100, |p| p as u32),
                    last_read: r.last_read.and_then(|t| k8s_openapi::jiff::Timestamp::from_second(t as i64).ok()).map(|t| t.to_string()),
                })
                .collect(),
            warm_problem: problem,
        };
        if !deleting && status != WarmStatus::of(li) {
            out.status.insert(name, status);
        }
    }
    // Orders for images that no longer exist at all (deleted without their finalizer) go too.
    let known: BTreeSet<String> = images.iter().map(|li| li.name_any()).collect();
    for list in new_orders.values_mut() {
        list.retain(|o| known.contains(&o.image));
    }
    for c in caches {
        let name = c.name_any();
        if let Some(list) = new_orders.get(&name) {
            if *list != c.spec.warm {
                out.orders.insert(name, (list.clone(), c.metadata.resource_version.clone()));
            }
        }
    }
    for n in nodes {
        let name = n.name_any();
        let mut want: BTreeSet<String> = BTreeSet::new();
        for img in warm_labels.get(&name).into_iter().flatten() {
            if want.len() >= max_labels {
                break;
            }
            if let Some(k) = label_key(img) {
                want.insert(k);
            }
        }
        let mut change = BTreeMap::new();
        for (k, v) in n.labels().iter().filter(|(k, _)| k.starts_with(LABEL_PREFIX)) {
            if !want.contains(k) || v != "true" {
                change.insert(k.clone(), want.contains(k).then(|| "true".to_string()));
            }
        }
        for k in want.iter().filter(|k| !n.labels().contains_key(*k)) {
            change.insert(k.clone(), Some("true".into()));
        }
        if !change.is_empty() {
            out.labels.insert(name, change);
        }
    }
    out
}

/// Runs placement passes against the API server, one at a time, paced.
pub struct Placer {
    client: kube::Client,
    recorder: Recorder,
    metrics: Arc<Metrics>,
    cfg: WarmConfig,
    pacer: tokio::sync::Mutex<(Pacer, tokio::time::Instant)>,
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PassOutcome {
    pub writes: usize,
    pub failed: usize,
}

impl Placer {
    pub fn new(client: kube::Client, recorder: Recorder, metrics: Arc<Metrics>, cfg: WarmConfig) -> Self {
        let pacer = Pacer::new(cfg.writes_per_s, cfg.write_burst);
        Placer { client, recorder, metrics, cfg, pacer: tokio::sync::Mutex::new((pacer, tokio::time::Instant::now())) }
    }

    /// One pass: read, plan, write the differences. Fails only if the cluster cannot be read;
    /// a write that fails is logged and left to the next pass.
    pub async fn pass(&self) -> Result<PassOutcome, String> {
        let mut pacer = self.pacer.lock().await;
        let lp = ListParams::default();
        let images = api_call("listing LazyImages", Api::<LazyImage>::all(self.client.clone()).list(&lp)).await?.items;
        let nodes = api_call("listing Nodes", Api::<Node>::all(self.client.clone()).list(&lp)).await?.items;
        let caches = api_call("listing NodeCaches", Api::<NodeCache>::all(self.client.clone()).list(&lp)).await?.items;
        let plan = plan(&images, &nodes, &caches, k8s_openapi::jiff::Timestamp::now(), self.cfg.max_labels);
        let mut outcome = PassOutcome::default();
        let by_name: BTreeMap<String, &LazyImage> = images.iter().map(|li| (li.name_any(), li)).collect();
        let pp = PatchParams::default();
        type Write<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;
        let mut writes: Vec<Write<'_>> = Vec::new();
        let caches_api: Api<NodeCache> = Api::all(self.client.clone());
        let images_api: Api<LazyImage> = Api::all(self.client.clone());
        let nodes_api: Api<Node> = Api::all(self.client.clone());
        for (node, (orders, rv)) in &plan.orders {
            // Decided on this version of the NodeCache: a newer one (a conflict) waits for the next pass.
            let patch = json!({"metadata": {"resourceVersion": rv}, "spec": {"warm": orders}});
            let (api, pp) = (caches_api.clone(), pp.clone());
            let what = format!("writing the orders of node {node}");
            writes.push(Box::pin(async move { api_call(&what, api.patch(node, &pp, &Patch::Merge(&patch))).await.map(|_| ()) }));
        }
        for (name, st) in &plan.status {
            let patch = json!({"status": {
                "orderedNodes": st.ordered_nodes, "warmNodes": st.warm_nodes, "cachedBytes": st.cached_bytes,
                "nodes": st.nodes, "warmProblem": st.warm_problem,
            }});
            let (api, pp) = (images_api.clone(), pp.clone());
            let what = format!("writing the warm status of LazyImage {name}");
            writes.push(Box::pin(async move { api_call(&what, api.patch_status(name, &pp, &Patch::Merge(&patch))).await.map(|_| ()) }));
        }
        for (node, change) in &plan.labels {
            let patch = json!({"metadata": {"labels": change}});
            let (api, pp) = (nodes_api.clone(), pp.clone());
            let what = format!("writing the warm labels of node {node}");
            writes.push(Box::pin(async move { api_call(&what, api.patch(node, &pp, &Patch::Merge(&patch))).await.map(|_| ()) }));
        }
        for (name, (add, drop)) in &plan.changes {
            let Some(li) = by_name.get(name) else { continue };
            let list = |v: &Vec<String>| {
                let mut s = v.iter().take(10).cloned().collect::<Vec<_>>().join(", ");
                if v.len() > 10 {
                    s.push_str(&format!(" and {} more", v.len() - 10));
                }
                s
            };
            let mut note = Vec::new();
            if !add.is_empty() {
                note.push(format!("ordered warm on {}", list(add)));
            }
            if !drop.is_empty() {
                note.push(format!("withdrawn from {}", list(drop)));
            }
            let ev = Event {
                type_: EventType::Normal,
                reason: "WarmOrders".into(),
                note: Some(note.join("; ")),
                action: "Place".into(),
                secondary: None,
            };
            let reference = li.object_ref(&());
            let recorder = &self.recorder;
            let what = format!("recording the orders of LazyImage {name}");
            writes.push(Box::pin(async move { api_call(&what, recorder.publish(&ev, &reference)).await }));
        }
        let (pacer, start) = &mut *pacer;
        for write in writes {
            while let Err(wait) = pacer.take(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            self.metrics.api_writes.fetch_add(1, Ordering::Relaxed);
            outcome.writes += 1;
            if let Err(e) = write.await {
                tracing::warn!(error = %e, "placement write failed; the next pass tries again");
                outcome.failed += 1;
            }
        }
        Ok(outcome)
    }

    /// Whether any node is still ordered to keep image `name`.
    pub async fn still_ordered(&self, name: &str) -> Result<bool, String> {
        let caches = api_call("listing NodeCaches", Api::<NodeCache>::all(self.client.clone()).list(&ListParams::default())).await?.items;
        Ok(caches.iter().any(|c| c.spec.warm.iter().any(|o| o.image == name)))
    }

    /// Passes every `every` until `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let passes = async {
            loop {
                match self.pass().await {
                    Ok(o) if o.writes > 0 => tracing::info!(writes = o.writes, failed = o.failed, "placement pass"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "placement pass failed"),
                }
                tokio::time::sleep(self.cfg.every).await;
            }
        };
        tokio::select! {
            _ = passes => {}
            _ = stop => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{LazyImageSpec, SecretRef, WarmPolicy};
    use lazy_image_csi_common::node_cache::{NodeCacheSpec, NodeCacheStatus};

    fn node(name: &str, ready: bool) -> Node {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}))
        .unwrap()
    }

    fn cache(name: &str, at: Option<k8s_openapi::jiff::Timestamp>) -> NodeCache {
        let mut c = NodeCache::new(name, NodeCacheSpec::default());
        c.status = Some(NodeCacheStatus { reported_at: at.map(|t| t.to_string()), ..Default::default() });
        c
    }

    fn image(name: &str, creds: bool) -> LazyImage {
        LazyImage::new(
            name,
            LazyImageSpec {
                url: "http://127.0.0.1:1/x".into(),
                format: None,
                digest: None,
                manifest_url: None,
                chunk_size: None,
                credentials_secret_ref: creds.then(|| SecretRef { name: "s".into(), namespace: "ns".into() }),
                warm: WarmPolicy { mode: WarmMode::Nodes, max_nodes: Some(3), ..Default::default() },
            },
        )
    }

    #[test]
    fn only_ready_reporting_nodes_are_ordered_and_shortfalls_are_said() {
        let now = k8s_openapi::jiff::Timestamp::now();
        let old = k8s_openapi::jiff::Timestamp::from_second(now.as_second() - STALE_AFTER.as_secs() as i64 - 1).unwrap();
        let nodes = [node("ok", true), node("down", false), node("stale", true), node("silent", true), node("no-plugin", true)];
        let caches = [cache("ok", Some(now)), cache("down", Some(now)), cache("stale", Some(old)), cache("silent", None)];
        let p = plan(&[image("m", false)], &nodes, &caches, now, 16);
        assert_eq!(p.orders.keys().collect::<Vec<_>>(), ["ok"]);
        let st = &p.status["m"];
        assert_eq!(st.ordered_nodes, 1);
        assert!(st.warm_problem.as_deref().unwrap_or_default().starts_with("1 of 3 nodes"), "{st:?}");
    }

    #[test]
    fn images_with_credentials_are_not_warmed_and_say_why() {
        let now = k8s_openapi::jiff::Timestamp::now();
        let p = plan(&[image("m", true)], &[node("ok", true)], &[cache("ok", Some(now))], now, 16);
        assert!(p.orders.is_empty());
        assert!(p.status["m"].warm_problem.as_deref().unwrap_or_default().contains("credentialsSecretRef"));
    }

    #[test]
    fn label_keys() {
        assert_eq!(label_key("model-v1.2").as_deref(), Some("warm.lazy-image.csi.dev/model-v1.2"));
        assert!(label_key(&"x".repeat(64)).is_none());
        assert!(label_key("-x").is_none() && label_key("").is_none());
    }
}
