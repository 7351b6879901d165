//! The `NodeCache` resource (cluster-scoped, `lazy-image.csi.dev/v1alpha1`, one per node, named
//! after it): the channel between the placement controller and a node's plugin. The controller
//! writes the spec (orders: the images to keep warm), the node writes the status (its report:
//! what it caches). Each side writes only its half, and only when something changed (see
//! `reports` for the node's pacing).

use crate::reports::NodeReport;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "lazy-image.csi.dev",
    version = "v1alpha1",
    kind = "NodeCache",
    plural = "nodecaches",
    status = "NodeCacheStatus",
    printcolumn = r#"{"name":"ORDERS","type":"integer","jsonPath":".status.orders"}"#,
    printcolumn = r#"{"name":"FREE","type":"integer","jsonPath":".status.cacheFreeBytes"}"#,
    printcolumn = r#"{"name":"REPORTED","type":"date","jsonPath":".status.reportedAt"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeCacheSpec {
    /// Images to fetch whole and keep (never evicted while listed), by LazyImage name. An image
    /// no longer listed may be dropped when the cache needs room.
    #[serde(default)]
    pub warm: Vec<WarmOrder>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmOrder {
    /// The LazyImage's name.
    pub image: String,
    /// The volume attributes the image is staged with (url, format, digest, manifestUrl,
    /// chunkSize): the node opens the image exactly as a volume of it would.
    pub attributes: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCacheStatus {
    #[serde(flatten)]
    pub report: NodeReport,
    /// How many warm orders the node carries out.
    #[serde(default)]
    pub orders: u32,
    /// RFC 3339 time of this report: the controller treats a node whose report is older than
    /// `STALE_AFTER` as gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_at: Option<String>,
}

/// A report older than this says the node's plugin is not running (two heartbeats and a bit).
pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(2 * 900 + 120);

/// The CRD as YAML, as the chart installs it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    crate::crd_yaml::<NodeCache>()
}

/// Where the chart keeps the generated CRD (relative to the repository root).
pub const CRD_PATH: &str = "deploy/helm/lazy-image/crds/nodecaches.lazy-image.csi.dev.yaml";

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in CRD is what the types generate (`lazy-image-crdgen nodecaches` writes it).
    #[test]
    fn checked_in_crd_matches_the_types() {
        assert!(
            crate::checked_in_crd(CRD_PATH) == crd_yaml().unwrap(),
            "{CRD_PATH} differs from the NodeCache types: run `cargo run -p lazy-image-csi-controller --bin lazy-image-crdgen -- nodecaches > {CRD_PATH}`"
        );
    }

    #[test]
    fn status_is_the_report_flattened() {
        let mut s = NodeCacheStatus { orders: 1, reported_at: Some("t".into()), ..Default::default() };
        s.report.cache_free_bytes = 5;
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["cacheFreeBytes"], 5);
        assert_eq!(v["orders"], 1);
        let back: NodeCacheStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }
}
