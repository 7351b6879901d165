//! The node's side of the NodeCache channel: reads its orders (the spec the controller writes),
//! has `Volumes` carry them out, and writes its cache report (the status) when the report policy
//! says so: on a change placement acts on, at most once per `min_interval`, and at least once per
//! `heartbeat`. Orders are read by a GET of the node's own object every `poll`.
//!
//! Runs only with an API server (an in-cluster account or a kubeconfig) and never touches a
//! staged volume: an API server that does not answer only delays reports and orders.

use crate::volumes::Volumes;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use lazy_image_csi_common::api_call;
use lazy_image_csi_common::node_cache::{NodeCache, NodeCacheSpec, NodeCacheStatus};
use lazy_image_csi_common::reports::{Decision, NodeReport, ReportPolicy};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub policy: ReportPolicy,
    /// How often the node reads its orders.
    pub poll: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing { policy: ReportPolicy::default(), poll: Duration::from_secs(30) }
    }
}

pub struct Reporter {
    api: Api<NodeCache>,
    nodes: Api<Node>,
    node: String,
    volumes: Arc<Volumes>,
    timing: Timing,
    written: Option<(NodeReport, Instant)>,
    /// Status writes made (for the metrics endpoint and tests).
    pub writes: u64,
}

impl Reporter {
    pub fn new(client: kube::Client, node: &str, volumes: Arc<Volumes>, timing: Timing) -> Self {
        Reporter {
            api: Api::all(client.clone()),
            nodes: Api::all(client),
            node: node.to_string(),
            volumes,
            timing,
            written: None,
            writes: 0,
        }
    }

    /// This node's NodeCache, created (owned by the Node, so it goes with it) if there is none.
    async fn own(&self) -> Result<NodeCache, String> {
        if let Some(nc) = api_call("reading this node's NodeCache", self.api.get_opt(&self.node)).await? {
            return Ok(nc);
        }
        let mut nc = NodeCache::new(&self.node, NodeCacheSpec::default());
        match api_call("reading this Node", self.nodes.get_opt(&self.node)).await {
            Ok(Some(n)) => {
                nc.metadata.owner_references = n.metadata.uid.map(|uid| {
                    vec![OwnerReference {
                        api_version: "v1".into(),
                        kind: "Node".into(),
                        name: self.node.clone(),
                        uid,
                        ..Default::default()
                    }]
                })
            }
            Ok(None) => tracing::warn!(node = %self.node, "no Node of this name: the NodeCache will outlive it"),
            Err(e) => tracing::warn!(error = %e, "the NodeCache will not be owned by its Node"),
        }
        match api_call("creating this node's NodeCache", self.api.create(&PostParams::default(), &nc)).await {
            Ok(nc) => {
                tracing::info!(node = %self.node, "NodeCache created");
                Ok(nc)
            }
            // Created meanwhile (a previous plugin's request that timed out): read it.
            Err(_) => api_call("reading this node's NodeCache", self.api.get(&self.node)).await,
        }
    }

    /// One round: orders read and carried out, the report written if the policy says so.
    /// Returns how long to wait before the next round.
    pub async fn tick(&mut self) -> Duration {
        let (failed, on_record) = match self.own().await {
            Ok(nc) => (self.volumes.apply_orders(&nc.spec.warm).await, nc.status.unwrap_or_default().report),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read this node's orders; keeping the ones held");
                return self.timing.poll;
            }
        };
        let report = self.volumes.cache_report(failed).await;
        let since = self.written.as_ref().map_or(Duration::MAX, |(_, at)| at.elapsed());
        match self.timing.policy.decide(&report, self.written.as_ref().map(|(r, _)| r), since) {
            Decision::WaitFor(d) => d.min(self.timing.poll),
            Decision::Write => {
                let status = NodeCacheStatus {
                    report: report.clone(),
                    orders: self.volumes.orders_held().await as u32,
                    reported_at: Some(k8s_openapi::jiff::Timestamp::now().to_string()),
                };
                let mut patch = serde_json::json!({ "status": status });
                // A merge patch keeps map keys it does not name: name the gone ones as null.
                for k in on_record.images.keys().filter(|k| !report.images.contains_key(*k)) {
                    patch["status"]["images"][k] = serde_json::Value::Null;
                }
                for k in on_record.failed_orders.keys().filter(|k| !report.failed_orders.contains_key(*k)) {
                    patch["status"]["failedOrders"][k] = serde_json::Value::Null;
                }
                self.writes += 1;
                self.volumes.report_writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match api_call(
                    "writing this node's cache report",
                    self.api.patch_status(&self.node, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
                {
                    Ok(_) => {
                        self.written = Some((report, Instant::now()));
                        self.timing.poll.min(self.timing.policy.min_interval.max(Duration::from_secs(1)))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot write the cache report; retrying");
                        self.timing.poll
                    }
                }
            }
        }
    }

    pub async fn run(mut self) {
        tracing::info!(node = %self.node, "cache reports on: reading warm orders and writing this node's NodeCache status");
        loop {
            let wait = self.tick().await;
            tokio::time::sleep(wait).await;
        }
    }
}
